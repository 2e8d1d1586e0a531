"""Where an index's rows live and how top-k is answered: one interface (:class:`VectorStore`), two backends.

- ``faiss`` (:class:`FaissStore`, the embedded default): the rows in the index folder
  (``embeddings-G.npy``), read into memory; exact top-k, or an approximate FAISS index kept next to
  them (``faiss-G.index``: IVF-Flat, IVF-PQ with exact re-ranking, HNSW; :mod:`vop.retrieval.ann`).
- ``milvus`` (:class:`vop.retrieval.milvus.MilvusStore`): the rows in a Milvus collection, one per index:
  a Milvus Lite file for one machine (``milvus:///PATH/x.db[/COLLECTION]``) or a Milvus server, standalone
  or a cluster (``milvus://HOST[:PORT][/COLLECTION]``); the same code talks to both.

Either way the index folder keeps what is not a vector: ``index.json`` (the model's provenance, the settings,
the store and its approximate index), the video list (``videos-G.jsonl``: a result's row is its line) and
the thumbnails. docs/search.md, "Stores", says what each store keeps and why.

The approximate index is chosen the same way for both (:class:`AnnChoice`): ``auto`` (a new index's
default) is exact search below :data:`EXACT_BELOW` videos, IVF-Flat up to :data:`PQ_FROM`, IVF-PQ with exact
re-ranking of the candidates above, its parameters derived from the collection's size (and recorded in
``index.json``); an explicit kind (``exact``, ``ivf``, ``ivfpq``, ``hnsw``) and explicit parameters always win.

Options are typed (:class:`StoreSpec`, :class:`AnnChoice`, :class:`SearchParams`) and parsed once, at the
edge (the CLI, ``build_index``); nothing here is global.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping
from urllib.parse import urlsplit

import numpy as np
import torch

from vop.errors import ConfigError

__all__ = ["StoreSpec", "AnnChoice", "ResolvedAnn", "SearchParams", "VectorStore", "FaissStore", "ANN_CHOICES",
           "EXACT_BELOW", "PQ_FROM", "MILVUS_PORT", "STORE_FORMS", "default_collection", "RESCORED_CANDIDATES",
           "rescored_candidates"]

#: what ``--ann`` accepts (``none`` is read as ``exact``: the older ``--faiss none``)
ANN_CHOICES = ("auto", "exact", "ivf", "ivfpq", "hnsw")
#: ``auto``: exact search below this many videos (2 ms at 10k, 22 ms at 100k, 0.3 s at 1M on 2 cores: docs/search.md)
EXACT_BELOW = 250_000
#: ``auto``: IVF-PQ (compressed vectors, candidates re-scored exactly) from this many videos; IVF-Flat below
PQ_FROM = 4_000_000
#: an index scored by its model, frames against the query (no approximate index: cma's query score), of at least :data:`EXACT_BELOW` videos is searched by candidates then exact
#: re-scoring with this many candidates unless ``candidates`` or ``exact`` says otherwise (recall@10 0.995 at 100k
#: synthetic videos, 15 times faster than scoring every video: docs/search.md, "Pairwise methods at scale")
RESCORED_CANDIDATES = 1000
#: Milvus's default port
MILVUS_PORT = 19530
STORE_FORMS = ("faiss (the default: rows in the index folder), milvus:///PATH/FILE.db[/COLLECTION] or "
               "milvus:FILE.db[/COLLECTION] (a Milvus Lite file), milvus://HOST[:PORT][/COLLECTION] (a Milvus server "
               "or cluster; port 19530 by default)")
_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def rescored_candidates(n: int, candidates: int | None, exact: bool | None) -> int | None:
    """The candidates an index of ``n`` videos scored by its model (frames against the query) is searched with: ``candidates`` if given, else
    :data:`RESCORED_CANDIDATES` from :data:`EXACT_BELOW` videos; None (every video scored) with ``exact`` or when
    the candidates would cover every video."""
    if exact:
        return None
    c = candidates if candidates is not None else (RESCORED_CANDIDATES if n >= EXACT_BELOW else None)
    return c if c is not None and c < n else None


def default_collection(index: str | os.PathLike) -> str:
    """The collection an index folder gets when ``--store`` names none: ``vop_`` + the folder's name."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", Path(index).resolve().name).strip("_") or "index"
    return f"vop_{name}"[:255]


@dataclass(frozen=True)
class StoreSpec:
    """Where an index keeps its rows (``vop index --store``): ``faiss`` (the index folder), or a Milvus
    collection in a Milvus Lite file (``lite``) or on a server (``host``, ``port``). ``timeout``: seconds a
    connection attempt or a call to the server may take before it is an error."""

    kind: str = "faiss"
    lite: Path | None = None
    host: str | None = None
    port: int | None = None
    collection: str | None = None
    timeout: float = 10.0

    @classmethod
    def parse(cls, text: str, index: str | os.PathLike | None = None) -> "StoreSpec":
        """``faiss``, ``milvus:///PATH/FILE.db[/COLLECTION]`` (a relative ``milvus://FILE.db`` is taken from the
        current folder; ``milvus:FILE.db`` and ``milvus:/PATH/FILE.db`` are short for those) or ``milvus://HOST[:PORT][/COLLECTION]``; without a collection: ``index``'s
        (:func:`default_collection`), or None when no ``index`` is given (``build_index`` then keeps the index's
        collection in that file or server, or takes the folder's). A ConfigError naming the forms otherwise."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"--store: give one of {STORE_FORMS}")
        text = text.strip()
        if text == "faiss":
            return cls()
        short = text[len("milvus:"):] if text.startswith("milvus:") and not text.startswith("milvus://") else None
        if short is not None and any(p.endswith(".db") and len(p) > 3 for p in short.split("/")):
            # the short form of a Lite file: milvus:FILE.db[/COLLECTION] (relative to the current folder) or
            # milvus:/ABS/FILE.db: the same as milvus://FILE.db and milvus:///ABS/FILE.db
            text = "milvus://" + short
        if not text.startswith("milvus://"):
            hint = " (a Milvus store is a URI: milvus:///PATH/FILE.db or milvus://HOST:PORT)" if text.startswith("milvus") else ""
            raise ConfigError(f"--store {text!r}: unknown store{hint}; use one of {STORE_FORMS}")
        rest = text[len("milvus://"):]
        parts = rest.split("/")
        at = next((i for i, p in enumerate(parts) if p.endswith(".db") and len(p) > 3), None)
        if at is not None:  # a Milvus Lite file
            file = "/".join(parts[:at + 1])
            coll = "/".join(parts[at + 1:]) or None
            spec = cls("milvus", lite=Path(os.path.abspath(os.path.expanduser(file))), collection=coll)
        else:
            if "@" in rest.split("/")[0]:
                raise ConfigError(f"--store {text!r}: credentials do not belong in the URI (index.json records it): "
                                  "set the environment variable VOP_MILVUS_TOKEN (user:password or an API key) instead")
            try:
                u = urlsplit(text)
                host, port = u.hostname, u.port
            except ValueError as e:
                raise ConfigError(f"--store {text!r}: not a Milvus address ({e}); use one of {STORE_FORMS}") from None
            if not host or u.query or u.fragment:
                raise ConfigError(f"--store {text!r}: not a Milvus address; use one of {STORE_FORMS}")
            coll = u.path.strip("/") or None
            spec = cls("milvus", host=host, port=port or MILVUS_PORT, collection=coll)
        if spec.collection is not None and not _COLLECTION.fullmatch(spec.collection):
            raise ConfigError(f"--store {text!r}: {spec.collection!r} is not a Milvus collection name (letters, digits "
                              "and _, not starting with a digit, at most 255)")
        if spec.collection is None and index is not None:
            spec = StoreSpec(spec.kind, spec.lite, spec.host, spec.port, default_collection(index), spec.timeout)
        return spec

    @classmethod
    def of(cls, meta: Mapping[str, Any] | None) -> "StoreSpec":
        """The store an index.json records (none: ``faiss``)."""
        rec = (meta or {}).get("store")
        if not rec or rec.get("kind", "faiss") == "faiss":
            return cls()
        lite = rec.get("lite")
        return cls("milvus", lite=Path(lite) if lite else None, host=rec.get("host"), port=rec.get("port"),
                   collection=rec.get("collection"), timeout=float(rec.get("timeout", 10.0)))

    @property
    def is_milvus(self) -> bool:
        return self.kind == "milvus"

    @property
    def address(self) -> str:
        """The file or host:port (for messages)."""
        if self.lite is not None:
            return str(self.lite)
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        """The ``--store`` value that names this store (no credentials: they are never recorded)."""
        if not self.is_milvus:
            return "faiss"
        base = f"milvus://{self.lite}" if self.lite is not None else f"milvus://{self.address}"
        return f"{base}/{self.collection}" if self.collection else base

    def same_place(self, other: "StoreSpec") -> bool:
        """Whether ``other`` names the same collection (or both are the folder)."""
        return (self.kind, self.lite, self.host, self.port, self.collection) == (
            other.kind, other.lite, other.host, other.port, other.collection)

    def record(self) -> dict[str, Any]:
        """Its part of index.json's ``store`` record."""
        if not self.is_milvus:
            return {"kind": "faiss"}
        return {"kind": "milvus", "uri": self.uri, "lite": str(self.lite) if self.lite is not None else None,
                "host": self.host, "port": self.port, "collection": self.collection, "timeout": self.timeout}


@dataclass(frozen=True)
class ResolvedAnn:
    """The approximate index an index gets: ``kind`` (``exact`` for none), its parameters, and why (``auto``'s
    reason, for index.json and the report)."""

    kind: str
    params: dict[str, Any]
    why: str = ""

    @property
    def exact(self) -> bool:
        return self.kind == "exact"


@dataclass(frozen=True)
class AnnChoice:
    """What ``--ann`` asked for: ``choice`` (:data:`ANN_CHOICES`) and explicit parameters (``nlist``, ``nprobe``,
    ``m``, ``nbits``, ``rerank``, ``opq``, ``M``, ``ef_construction``, ``ef_search``), which win over the ones
    derived from the collection's size."""

    choice: str = "auto"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.choice not in ANN_CHOICES:
            raise ConfigError(f"--ann must be one of {', '.join(ANN_CHOICES)} (none = exact), got {self.choice!r}")

    @classmethod
    def parse(cls, text: str | None, params: Mapping[str, Any] | None = None) -> "AnnChoice":
        choice = "exact" if text in ("none", "exact") else text
        return cls(choice or "auto", {k: v for k, v in (params or {}).items() if v is not None})

    @classmethod
    def of(cls, meta: Mapping[str, Any] | None) -> "AnnChoice | None":
        """The choice an index.json records; one written before ``ann`` was recorded kept the kind it had
        (its FAISS index with the parameters it was built with, or exact search): an explicit choice."""
        if not meta:
            return None
        rec = meta.get("ann")
        if isinstance(rec, dict) and rec.get("choice") in ANN_CHOICES:
            return cls(rec["choice"], dict(rec.get("params") or {}))
        f = meta.get("faiss")
        if f:
            return cls(f["kind"], dict(f.get("params") or {}))
        return cls("exact")

    def resolve(self, n: int, dim: int) -> ResolvedAnn:
        """The kind and parameters for ``n`` vectors of dimension ``dim``."""
        from vop.retrieval.ann import merge_params

        if self.choice == "auto":
            if n < EXACT_BELOW:
                return ResolvedAnn("exact", {}, f"auto: {n:,} videos < {EXACT_BELOW:,}")
            kind = "ivf" if n < PQ_FROM else "ivfpq"
            why = f"auto: {n:,} videos >= {EXACT_BELOW if kind == 'ivf' else PQ_FROM:,}"
        else:
            kind, why = self.choice, "explicit"
        if kind == "exact":
            return ResolvedAnn("exact", {}, why)
        return ResolvedAnn(kind, merge_params(kind, n, dim, dict(self.params)), why)

    def record(self, resolved: ResolvedAnn) -> dict[str, Any]:
        """index.json's ``ann``: the choice and its explicit parameters, what it gave and why."""
        return {"choice": self.choice, "params": dict(self.params), "kind": resolved.kind, "why": resolved.why}


@dataclass(frozen=True)
class SearchParams:
    """Per-query knobs of an approximate index (None: the index's recorded value): IVF lists scanned
    (``nprobe``), HNSW breadth (``ef_search``), candidates per result re-scored exactly (``rerank``: k x rerank
    candidates; 0: none). ``candidates``: for a scoring without one vector per video (cma's query score), the
    videos per query whose mean-pooled frame vectors score best, re-scored exactly by the model's scoring
    (:func:`vop.retrieval.topk.pooled_then_rescore`); None: every video scored exactly below :data:`EXACT_BELOW`
    videos, :data:`RESCORED_CANDIDATES` from there (:func:`rescored_candidates`)."""

    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int | None = None
    candidates: int | None = None


class VectorStore:
    """The rows of an index and the top-k over them. Rows are addressed by their position in the index's video
    list (``videos-G.jsonl``), whatever the backend keys them by.

    ``search(scoring, q, k, exact=, params=)`` -> ``(scores (Q, k'), rows (Q, k'))``, ``k' = min(k, N)``, best
    first, equal scores ordered by row, ``-1`` rows where fewer were found; ``k >= N`` ranks every video
    exactly. ``vectors(rows)``: the stored rows (for exact re-scoring of candidates, migrating, checking).
    """

    kind: ClassVar[str] = ""

    @property
    def search_kind(self) -> str:
        """``exact``, ``ivf``, ``ivfpq`` or ``hnsw``: what answers a query by default."""
        raise NotImplementedError

    def search(self, scoring: Any, q: torch.Tensor, k: int, *, exact: bool | None = None,
               params: SearchParams = SearchParams()) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def where(self) -> str:
        """What holds the rows (a file, a collection), for messages."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what it holds open (a connection; a Milvus Lite file's lock)."""


class FaissStore(VectorStore):
    """The rows in memory (read from the index folder's ``embeddings-G.npy``) and, optionally, a FAISS index
    over them (``faiss-G.index``, loaded on first use)."""

    kind = "faiss"

    def __init__(self, path: Path, meta: dict[str, Any], emb: np.ndarray):
        self.path, self.meta, self.emb = path, meta, emb
        self._faiss: Any = None
        self._emb_t: torch.Tensor | None = None
        self._cache: torch.Tensor | None = None
        self._rerank: np.ndarray | None = None
        self._pooled: torch.Tensor | None = None
        if isinstance(emb, np.memmap) and meta.get("faiss"):  # a large index behind an approximate one: random reads
            from vop.retrieval.ann import random_access

            random_access(emb)

    @property
    def faiss_kind(self) -> str | None:
        f = self.meta.get("faiss")
        return f["kind"] if f else None

    @property
    def search_kind(self) -> str:
        return self.faiss_kind or "exact"

    def where(self) -> str:
        return str(self.path / self.meta["files"]["embeddings"])

    @property
    def emb_tensor(self) -> torch.Tensor:
        if self._emb_t is None:
            if self.emb.flags.writeable:
                self._emb_t = torch.from_numpy(self.emb)
            else:  # a read-only memory map (a large index, vop.retrieval.format.MMAP_FROM): never written through
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    self._emb_t = torch.from_numpy(self.emb)
        return self._emb_t

    def pooled(self) -> torch.Tensor:
        """Per-frame rows (N, F, D) mean-pooled over the frames and L2-normalised (N, D): the first stage of a
        candidate search of an index scored by its model, computed once on first use and kept (N x D floats: 0.2 GB at 100k)."""
        if self._pooled is None:
            v = self.emb_tensor
            parts = []
            with torch.no_grad():
                for s in range(0, v.shape[0], 1 << 14):
                    parts.append(torch.nn.functional.normalize(v[s:s + (1 << 14)].float().mean(1), dim=-1))
            self._pooled = torch.cat(parts) if parts else torch.zeros((0, v.shape[-1]))
        return self._pooled

    def rerank_vectors(self) -> np.ndarray | None:
        """IVF-PQ's float16 copy of the rows (``rerank-G.npy``, memory-mapped), or None when it re-ranks from the rows."""
        name = self.meta["files"].get("rerank")
        if not name:
            return None
        if self._rerank is None:
            from vop.errors import DataError
            from vop.retrieval.format import rebuild_command

            file = self.path / name
            try:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # noqa: BLE001 - a damaged header: numpy's error, named
                raise DataError(f"{file}: not a readable .npy array ({type(e).__name__}); the index is damaged: rebuild "
                                f"it: {rebuild_command(self.path, self.meta)}") from None
            if arr.dtype != np.dtype("<f2") or arr.shape != self.emb.shape:
                raise DataError(f"{file}: holds {arr.dtype} {arr.shape}, expected float16 {tuple(self.emb.shape)}; the index "
                                f"is damaged: rebuild it: {rebuild_command(self.path, self.meta)}")
            from vop.retrieval.ann import random_access

            random_access(arr)  # candidates are read at random: one page each, no read-around
            self._rerank = arr
        return self._rerank

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.emb[np.asarray(rows, dtype=np.int64)]

    def faiss_index(self, **search_params: Any):
        """The FAISS index (loaded once), with optional search parameters (nprobe, ef_search)."""
        from vop.errors import DataError
        from vop.retrieval.ann import load_faiss, set_search_params
        from vop.retrieval.format import rebuild_command

        f = self.meta.get("faiss")
        if not f:
            raise ConfigError(f"{self.path}: has no FAISS index; build it with `vop index ... --ann ivf|ivfpq|hnsw`")
        if self._faiss is None:
            file = self.path / self.meta["files"]["faiss"]
            try:
                self._faiss = load_faiss(file, f["kind"], f["params"])
            except ConfigError:
                raise
            except Exception as e:  # faiss raises RuntimeError for a file it cannot parse
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"{file}: not a readable FAISS index ({first}); the index is damaged: rebuild it: "
                                f"{rebuild_command(self.path, self.meta)}") from None
        if any(v is not None for v in search_params.values()):
            set_search_params(self._faiss, f["kind"], {**f["params"], **{k: v for k, v in search_params.items() if v is not None}})
        return self._faiss

    def row_cache(self, scoring: Any) -> torch.Tensor | None:
        """The scoring's ``cache`` of every stored row, computed once on first use and kept (see
        :meth:`vop.retrieval.index.VideoIndex.gallery_cache`)."""
        if self._cache is None:
            v = self.emb_tensor
            step, parts = 1 << 16, []
            with torch.no_grad():
                for s in range(0, v.shape[0], step):
                    part = scoring.cache(v[s:s + step])
                    if part is None:
                        return None
                    parts.append(part)
            self._cache = torch.cat(parts) if parts else None
        return self._cache

    def search(self, scoring: Any, q: torch.Tensor, k: int, *, exact: bool | None = None,
               params: SearchParams = SearchParams()) -> tuple[np.ndarray, np.ndarray]:
        from vop.retrieval.topk import check_candidates, pooled_then_rescore, search_rows

        if not scoring.ann and self.emb.ndim == 3:
            if params.candidates is not None and exact is not True:
                check_candidates(params.candidates, k, len(self.emb))
            c = rescored_candidates(len(self.emb), params.candidates, exact)
            if c is not None:
                return pooled_then_rescore(scoring, self.emb_tensor, self.pooled(), q, k, c, cache=self.row_cache(scoring))
        f = self.meta.get("faiss")
        ann: Callable[[], Any] | None = None
        rerank, rerank_rows = 0, None
        if f:
            ann = lambda: self.faiss_index(nprobe=params.nprobe, ef_search=params.ef_search)  # noqa: E731
            rerank = int(params.rerank if params.rerank is not None else f["params"].get("rerank", 0) or 0)
            half = self.rerank_vectors() if rerank else None
            if half is not None:
                rerank_rows = lambda c: torch.from_numpy(half[c].astype(np.float32))  # noqa: E731
        return search_rows(scoring, self.emb_tensor, q, k, cache=self.row_cache(scoring), ann=ann, exact=exact,
                           rerank=rerank, rerank_rows=rerank_rows)
