"""Approximate nearest-neighbour search with FAISS (optional extra ``vop[index]`` = ``faiss-cpu``).

Three kinds, all on inner product (= cosine: the embeddings are L2-normalised):

- ``ivf``: IVF-Flat. k-means into ``nlist`` lists at build time; a query scans the ``nprobe`` nearest
  lists. Exact scores for the vectors it scans; recall grows with ``nprobe`` (``nprobe = nlist`` scans
  everything). Build cost: training k-means + one assignment pass; memory: the vectors themselves.
  Defaults: ``nlist = sqrt(N)`` (at most ``N / 39`` so that every centroid has training points;
  k-means sees at most 64 vectors per list, so a million-vector build takes about a minute on 2 cores),
  ``nprobe = 32`` (more above 512 lists: ``nlist / 16``).
- ``ivfpq``: IVF-PQ (optionally with an OPQ rotation, ``opq``): the vectors are compressed to ``m`` codes of
  ``nbits`` bits (64 bytes per 512-d vector by default, against 2,048), so its scores are approximate; the
  ``rerank`` x k best candidates are re-scored from stored vectors (``rerank_dtype``: ``float16``, the
  default, a half-precision copy of the rows in ``rerank-G.npy``, read through a memory map, half the
  page cache of the float32 rows; ``float32``: the rows themselves) and the top k kept, their scores
  computed from the float32 rows (:func:`vop.retrieval.topk.rescore`): exact scores. Defaults:
  ``nlist = min(4 sqrt(N), N / 39, 1024)`` (:data:`PQ_NLIST_MAX`: assigning N vectors to their lists costs
  N x nlist x D multiply-adds at build time: 5e12 at 10M; the whole 10M build took 25 minutes on a busy 2-core machine), ``m = D / 8``
  (a divisor of D), ``nbits = 8``, ``nprobe = 16``, ``rerank = 100`` (1,000 candidates for k = 10: recall@10 0.94 at
  10M clustered vectors, docs/search.md). For collections of millions of videos
  (``--ann auto`` picks it from :data:`vop.retrieval.store.PQ_FROM` videos). Built in bounded memory:
  trained on a sample (:func:`train_sample`), then the rows added in chunks of :data:`ADD_CHUNK`
  (:func:`iter_rows`: a memory-mapped ``embeddings-G.npy`` is read chunk by chunk, its pages let go).
- ``hnsw``: HNSW-Flat graph, ``M`` links per node (default 32), ``ef_construction`` 200 and
  ``ef_search`` 128. Faster queries at high recall than IVF, but a slow, single-pass build and about
  ``M * 8`` extra bytes per vector; it cannot be trained incrementally either.

The index is rebuilt from all embeddings whenever ``vop index`` changes the collection.
See docs/search.md for measured recall@10 and latency.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from vop.errors import ConfigError

__all__ = ["KINDS", "require_faiss", "default_params", "merge_params", "pq_m", "build_faiss", "faiss_search", "save_faiss",
           "load_faiss", "iter_rows", "train_sample", "random_access", "PQ_NLIST_MAX", "ADD_CHUNK", "RERANK_DTYPES"]

KINDS = ("ivf", "ivfpq", "hnsw")
#: IVF-PQ's default lists at most (the coarse assignment of N vectors costs N x nlist x D at build time)
PQ_NLIST_MAX = 1024
#: rows added to an IVF index per call (float32: 128 MiB at 512-d)
ADD_CHUNK = 1 << 16
#: what IVF-PQ re-ranks its candidates with: a float16 copy of the rows (``rerank-G.npy``) or the rows
RERANK_DTYPES = ("float16", "float32")


def _drop_pages(arr: np.ndarray) -> None:
    """Let go of the pages of a memory-mapped array this process has touched (they stay in the page cache):
    a pass over a file larger than memory keeps the resident set at one chunk."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) if isinstance(base, np.memmap) and getattr(base, "_mmap", None) is not None \
            else getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(base, "madvise"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - an mmap that refuses: only the resident set grows
            pass


def random_access(arr: np.ndarray) -> None:
    """Tell the kernel that a memory-mapped array is read at random rows (``MADV_RANDOM``): a page fault then
    reads its page, not the default read-around of 32 pages (128 KiB for a 1 KiB row): a re-ranking of 1,000
    candidates reads 4 MiB from disk instead of 128 MiB, and keeps as little of the page cache."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) if isinstance(base, np.memmap) and getattr(base, "_mmap", None) is not None \
            else getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        try:
            base.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):  # pragma: no cover - only the read-ahead stays
            pass


def iter_rows(emb: np.ndarray, step: int = ADD_CHUNK, start: int = 0, stop: int | None = None):
    """``(first row, float32 C-order copy of rows [first, first + step))`` over ``emb`` (N, D): an array in memory
    or a memory-mapped file (its pages let go after each chunk, so a pass over 20 GB of rows holds one chunk)."""
    stop = len(emb) if stop is None else stop
    for s in range(start, stop, step):
        part = np.array(emb[s:min(s + step, stop)], dtype=np.float32, order="C", copy=True)
        _drop_pages(emb)
        yield s, part


def train_sample(emb: np.ndarray, size: int, seed: int = 1234) -> np.ndarray:
    """``size`` rows of ``emb`` drawn at random without replacement (in row order; all of them if there are
    fewer), float32, read one chunk of the file at a time."""
    n = len(emb)
    if size >= n:
        return np.concatenate([c for _, c in iter_rows(emb)]) if n else np.zeros((0, emb.shape[1]), np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = np.empty((size, emb.shape[1]), np.float32)
    step = ADD_CHUNK * 4
    for s in range(0, size, step):
        out[s:s + step] = emb[rows[s:s + step]]
        _drop_pages(emb)
    return out


def require_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ConfigError("FAISS is not installed: pip install 'vop[index]' (faiss-cpu), or use exact search "
                          "(the default, fine up to a few hundred thousand videos)") from None
    return faiss


def pq_m(dim: int) -> int:
    """IVF-PQ's sub-quantizers for dimension ``dim``: the largest divisor of ``dim`` at most ``dim / 8``
    (8-dimensional sub-vectors: 64 for 512), at least 1."""
    target = max(1, dim // 8)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def default_params(kind: str, n: int, dim: int | None = None) -> dict[str, Any]:
    """The parameters of an index of ``kind`` over ``n`` vectors of dimension ``dim`` (derived from the size;
    recorded in index.json)."""
    if kind == "ivf":
        nlist = max(1, min(int(math.sqrt(max(n, 1))), max(1, n // 39)))
        return {"nlist": nlist, "nprobe": min(nlist, max(32, nlist // 16))}
    if kind == "ivfpq":
        nlist = max(1, min(4 * int(math.sqrt(max(n, 1))), max(1, n // 39), PQ_NLIST_MAX))
        return {"nlist": nlist, "nprobe": min(nlist, 16), "m": pq_m(dim or 512), "nbits": 8, "rerank": 100, "opq": False,
                "rerank_dtype": "float16"}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 200, "ef_search": 128}
    raise ConfigError(f"unknown FAISS index kind {kind!r}: use one of {', '.join(KINDS)} (or none for exact search)")


def merge_params(kind: str, n: int, dim: int | None, explicit: dict[str, Any] | None) -> dict[str, Any]:
    """The derived parameters (:func:`default_params`) with the ``explicit`` ones over them; a derived
    ``nprobe`` never exceeds an explicit ``nlist``."""
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    p = {**default_params(kind, n, dim), **explicit}
    if "nprobe" in p and "nlist" in p and "nprobe" not in explicit:
        p["nprobe"] = min(int(p["nprobe"]), int(p["nlist"]))
    return p


def build_faiss(emb: np.ndarray, kind: str, params: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """An index over ``emb`` (N, D) float32 L2-normalised rows (in memory, or a memory map of a file larger than
    memory); returns it and the parameters used. IVF kinds are trained on a sample (``nlist`` x
    ``train_per_list`` rows, default 64; at least 2^nbits x 39 for the PQ codebooks) and the rows added in
    chunks (:func:`iter_rows`): memory holds the index, the sample and one chunk, never a copy of the rows."""
    faiss = require_faiss()
    n, d = emb.shape
    p = merge_params(kind, n, d, params)
    if kind == "ivfpq":
        m, nbits = int(p["m"]), int(p["nbits"])
        if d % m:
            raise ConfigError(f"IVF-PQ: m={m} sub-quantizers must divide the dimension {d}")
        if n < max(p["nlist"], 1 << nbits):
            raise ConfigError(f"IVF-PQ needs at least {max(p['nlist'], 1 << nbits)} videos (nlist={p['nlist']} lists and "
                              f"2^nbits={1 << nbits} codes), the index has {n}: use exact search or ivf")
        if p.get("rerank_dtype", "float32") not in RERANK_DTYPES:
            raise ConfigError(f"IVF-PQ: rerank_dtype must be one of {', '.join(RERANK_DTYPES)}, got {p['rerank_dtype']!r}")
        key = f"{'OPQ%d,' % m if p.get('opq') else ''}IVF{int(p['nlist'])},PQ{m}x{nbits}"
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        faiss.downcast_index(ivf).do_polysemous_training = False  # (Hamming-distance filtering of codes, unused: its training is the slowest part)
        per_list = int(p.get("train_per_list", 64))
        sample = max(int(p["nlist"]) * per_list, (1 << nbits) * 39)
    elif kind == "ivf":
        if n < p["nlist"]:
            raise ConfigError(f"IVF needs at least nlist={p['nlist']} videos, the index has {n}: use exact search")
        quantizer = faiss.IndexFlatIP(d)
        index = ivf = faiss.IndexIVFFlat(quantizer, d, int(p["nlist"]), faiss.METRIC_INNER_PRODUCT)
        per_list = int(p.get("train_per_list", 64))
        sample = int(p["nlist"]) * per_list
    else:
        index = faiss.IndexHNSWFlat(d, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["ef_construction"])
        for _, part in iter_rows(emb):
            index.add(part)
        index.hnsw.efSearch = int(p["ef_search"])
        return index, p
    ivf.cp.seed = 1234
    ivf.cp.max_points_per_centroid = per_list
    # k-means sees at most nlist x per_list rows anyway (faiss subsamples): draw them here, from the file
    index.train(train_sample(emb, sample))
    for _, part in iter_rows(emb):
        index.add(part)
    ivf.nprobe = int(p["nprobe"])
    return index, p


def set_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf" and params.get("nprobe"):
        index.nprobe = int(params["nprobe"])
    elif kind == "ivfpq" and params.get("nprobe"):
        require_faiss().extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw" and params.get("ef_search"):
        index.hnsw.efSearch = int(params["ef_search"])


def faiss_search(index: Any, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k), rows (Q, k)); rows are -1 where fewer than k vectors were reached."""
    return index.search(np.ascontiguousarray(q, dtype=np.float32), int(k))


def save_faiss(index: Any, path: Path) -> None:
    faiss = require_faiss()
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


def load_faiss(path: Path, kind: str, params: dict[str, Any]) -> Any:
    faiss = require_faiss()
    index = faiss.read_index(str(path))
    set_search_params(index, kind, params)
    return index
