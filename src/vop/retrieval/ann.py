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
  ``rerank`` x k best candidates are re-scored exactly from the stored rows
  (:func:`vop.retrieval.topk.rescore`) before the top k is kept. Defaults: ``nlist = 4 sqrt(N)``, ``m = D / 8``
  (a divisor of D), ``nbits = 8``, ``nprobe = 64``, ``rerank = 4``. For collections of millions of videos
  (``--ann auto`` picks it from :data:`vop.retrieval.store.PQ_FROM` videos).
- ``hnsw``: HNSW-Flat graph, ``M`` links per node (default 32), ``ef_construction`` 200 and
  ``ef_search`` 128. Faster queries at high recall than IVF, but a slow, single-pass build and about
  ``M * 8`` extra bytes per vector; it cannot be trained incrementally either.

The index is rebuilt from all embeddings whenever ``vop index`` changes the collection.
See docs/search.md for measured recall@10 and latency.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vop.errors import ConfigError

__all__ = ["KINDS", "require_faiss", "default_params", "merge_params", "pq_m", "build_faiss", "faiss_search", "save_faiss", "load_faiss"]

KINDS = ("ivf", "ivfpq", "hnsw")


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
        nlist = max(1, min(4 * int(math.sqrt(max(n, 1))), max(1, n // 39)))
        return {"nlist": nlist, "nprobe": min(nlist, 64), "m": pq_m(dim or 512), "nbits": 8, "rerank": 4, "opq": False}
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
    """An index over ``emb`` (N, D) float32 L2-normalised rows; returns it and the parameters used."""
    faiss = require_faiss()
    n, d = emb.shape
    p = merge_params(kind, n, d, params)
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if kind == "ivfpq":
        m, nbits = int(p["m"]), int(p["nbits"])
        if d % m:
            raise ConfigError(f"IVF-PQ: m={m} sub-quantizers must divide the dimension {d}")
        if n < max(p["nlist"], 1 << nbits):
            raise ConfigError(f"IVF-PQ needs at least {max(p['nlist'], 1 << nbits)} videos (nlist={p['nlist']} lists and "
                              f"2^nbits={1 << nbits} codes), the index has {n}: use exact search or ivf")
        key = f"{'OPQ%d,' % m if p.get('opq') else ''}IVF{int(p['nlist'])},PQ{m}x{nbits}"
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = 1234
        ivf.cp.max_points_per_centroid = int(p.get("train_per_list", 64))
        index.train(x)
        index.add(x)
        ivf.nprobe = int(p["nprobe"])
    elif kind == "ivf":
        if n < p["nlist"]:
            raise ConfigError(f"IVF needs at least nlist={p['nlist']} videos, the index has {n}: use exact search")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, int(p["nlist"]), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        index.cp.max_points_per_centroid = int(p.get("train_per_list", 64))
        index.train(x)
        index.add(x)
        index.nprobe = int(p["nprobe"])
    else:
        index = faiss.IndexHNSWFlat(d, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["ef_construction"])
        if n:
            index.add(x)
        index.hnsw.efSearch = int(p["ef_search"])
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
