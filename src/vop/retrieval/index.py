"""A video index: one row per video (a dual encoder's L2-normalised embedding, or what the model's scoring
stores: cma's query score keeps the per-frame embeddings), its metadata and a thumbnail strip.

:class:`VideoIndex` is a loaded index: ``VideoIndex.open(path)`` reads it (the on-disk format and its
integrity checks: :mod:`vop.retrieval.format`) and ``search`` ranks its videos for encoded queries
(:mod:`vop.retrieval.topk`, with the scoring of the model the index was built with). The other parts:

- :mod:`vop.retrieval.format`: layout, ``index.json`` and its checks, checksums, safe reading, writing
  a generation (:func:`write_index`);
- :mod:`vop.retrieval.provenance`: what an index records about its model, checked before loading it;
- :mod:`vop.retrieval.build`: ``vop index`` (:func:`build_index`: plan, encode in parts, merge, write,
  atomic move; resumable, incremental, several processes under torchrun);
- :mod:`vop.retrieval.store`: where the rows live (the folder, with or without FAISS; or a Milvus collection,
  :mod:`vop.retrieval.milvus`) and how each answers top-k;
- :mod:`vop.retrieval.topk`: exact blockwise top-k for any scoring, FAISS where it applies, and exact
  re-scoring of candidates.

Their public names are importable from here too, as before the split.

Frames are sampled and resized exactly as the evaluation engine does, and rows are the model's
scoring's (:mod:`vop.scoring`), so an index of a dataset split ranks videos exactly as ``vop eval`` does.
A scoring without one vector per video (cma's query score) cannot be searched approximately: every
query is scored exactly against every video, in bounded blocks, and no FAISS index is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vop.errors import ConfigError, DataError
from vop.retrieval.build import BuildReport, build_index
from vop.retrieval.encode import TEST_STOP_ENV, nonfinite_error
from vop.retrieval.format import (FORMAT, StoredScoring, building_path, check_meta, check_model_record, file_record,
                                  read_index, read_meta, rebuild_command, sha256_file, write_index)
from vop.retrieval.provenance import (backbone_file, checkpoint_info, checkpoint_sha256, load_index_model, model_files,
                                      sha256_of_checkpoint_records, verify_model_files)
from vop.retrieval.store import FaissStore, SearchParams, VectorStore
from vop.retrieval.topk import check_k, exact_search, search_rows, top_k
from vop.scoring import Scoring, builtin_scoring

__all__ = ["FORMAT", "VideoIndex", "build_index", "BuildReport", "checkpoint_info", "load_index_model",
           "write_index", "sha256_file", "checkpoint_sha256", "building_path", "exact_search", "top_k", "search_rows",
           "check_k", "rebuild_command", "model_files", "verify_model_files", "read_meta", "check_meta",
           "check_model_record", "kind_mismatch", "StoredScoring", "TEST_STOP_ENV", "nonfinite_error", "file_record",
           "backbone_file", "sha256_of_checkpoint_records"]


@dataclass
class VideoIndex:
    """A loaded index: ``meta`` (index.json), ``entries`` (N dicts: the video list; a result's row is its
    position) and ``store``, where its rows live and top-k is answered (:mod:`vop.retrieval.store`: the index
    folder's embeddings, with or without FAISS, or a Milvus collection). ``scoring``: how its rows are scored
    (:class:`~vop.retrieval.format.StoredScoring`); ``emb``: the rows (N, *row_shape) float32 (a dual encoder:
    (N, D); cma's query score: (N, F, D), the raw per-frame embeddings); from a Milvus store they are fetched."""

    path: Path
    meta: dict[str, Any]
    entries: list[dict[str, Any]]
    store: VectorStore
    verified: bool = True  # the files' checksums (or, for an older index, finite values) were checked at open

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> "VideoIndex":
        """Read an index (:func:`~vop.retrieval.format.read_index`). ``index.json`` is checked field by
        field; the embeddings' header (dtype, shape: the count and row shape index.json records) and size
        are checked before any data is read; with ``verify`` (default) every file is checked against the
        SHA-256 recorded when it was written (an index of an older vop, without checksums: its embeddings
        are checked for NaN/inf instead, with a warning). Any damage is a DataError naming the file and the
        command that rebuilds the index. ``verify=False`` skips the hashing (about 1.2 s per 2 GB of
        embeddings); a non-finite score is still refused when searching.

        An index in a Milvus store: its collection is checked against index.json (schema, UUID, generation,
        row count; with ``verify`` its keys against the video list) by
        :meth:`vop.retrieval.milvus.MilvusStore.open`."""
        path = Path(path)
        meta, emb, entries = read_index(path, verify=verify)
        if emb is None:
            from vop.retrieval.milvus import MilvusStore

            store: VectorStore = MilvusStore.open(path, meta, entries, verify=verify, hint=rebuild_command(path, meta))
        else:
            store = FaissStore(path, meta, emb)
        return cls(path, meta, entries, store, verified=verify)

    def close(self) -> None:
        """Let go of the store's connection (a Milvus Lite file is then free for other processes)."""
        self.store.close()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def scoring(self) -> StoredScoring:
        """How the rows are scored: kind (``cosine``, ``qscore``, ...), row shape, whether FAISS applies."""
        return StoredScoring.of(self.meta)

    def check_model(self, model: Any, checkpoint: str | os.PathLike | None = None) -> None:
        """Refuse a model whose kind of scores (``model.scoring.kind``) is not the index's."""
        if model.scoring.kind != self.scoring.kind:
            raise ConfigError(kind_mismatch(self.path, self.scoring, checkpoint, model.scoring,
                                            getattr(model, "name", type(model).__name__), self.meta))

    def scoring_for(self, model: Any = None) -> Scoring:
        """The scoring that ranks this index: ``model``'s (refused unless of the index's kind), or without a
        model the built-in one of the index's kind (a dual encoder's cosine); a ConfigError for a kind that
        needs its model (cma's query score)."""
        if model is not None:
            self.check_model(model)  # a model given with an index of another kind is refused, never ignored
            return model.scoring
        scoring = builtin_scoring(self.scoring.kind)
        if scoring is None:
            raise ConfigError(f"{self.path}: {self.scoring.label} ({self.model_info.get('method')}) is scored by its "
                              "model: search it with vop.retrieval.Searcher (or pass model=)")
        return scoring

    @property
    def model_info(self) -> dict[str, Any]:
        return self.meta["model"]

    @property
    def store_kind(self) -> str:
        """``faiss`` (the rows in the folder) or ``milvus``."""
        return self.store.kind

    @property
    def search_kind(self) -> str:
        """What answers a query by default: ``exact``, ``ivf``, ``ivfpq`` or ``hnsw`` (in either store)."""
        return self.store.search_kind

    def search_mode(self, exact: bool | None = None, candidates: int | None = None) -> str:
        """What answers a query with this ``exact`` setting (the ``search`` field of the JSON answers); a
        index scored by its model, searched by candidates (:meth:`candidates_for`): ``candidates``."""
        if self.candidates_for(candidates, exact) is not None:
            return "candidates"
        return "exact" if exact else self.search_kind

    def candidates_for(self, candidates: int | None = None, exact: bool | None = None) -> int | None:
        """The candidates a query of this index (scored by its model) is answered with (``candidates``, or the default from
        :data:`~vop.retrieval.store.EXACT_BELOW` videos: :func:`~vop.retrieval.store.rescored_candidates`); None
        when every video is scored (a dual-encoder index: always None)."""
        from vop.retrieval.store import rescored_candidates

        if self.scoring.ann:
            return None
        return rescored_candidates(len(self), candidates, exact)

    @property
    def faiss_kind(self) -> str | None:
        f = self.meta.get("faiss")
        return f["kind"] if f else None

    def _faiss_store(self) -> FaissStore:
        if not isinstance(self.store, FaissStore):
            raise ConfigError(f"{self.path}: its rows are in {self.store.where()}, not in the folder")
        return self.store

    def faiss_index(self, **search_params: Any):
        """The FAISS index (loaded once), with optional search parameters (nprobe, ef_search)."""
        return self._faiss_store().faiss_index(**search_params)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 5, *, exact: bool | None = None,
               nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
               model: Any = None, candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query (Q, D) (the model's ``scoring.queries``: L2-normalised for a dual
        encoder): ``(scores (Q, k'), rows (Q, k'))``, best first, ``k' = min(k, N)``; ties ordered by row
        (:func:`~vop.retrieval.topk.search_rows`). Exact unless the index has an approximate index (FAISS, or
        the Milvus collection's) and ``exact`` is not True. ``nprobe``, ``ef_search``, ``rerank``
        (:class:`~vop.retrieval.store.SearchParams`): per-query settings of the approximate index.

        ``model``: the index's model (its scoring, refused unless of the index's kind); needed where the
        scores need it (cma's query score: the queries are its raw text embeddings, every video is scored
        exactly, and ``exact``, ``nprobe``, ``ef_search`` do not apply: there is no approximate index).
        ``candidates`` (an index scored by its model only; None: every video scored): the C videos whose mean-pooled frame
        vectors are nearest each query, re-scored exactly (:func:`~vop.retrieval.topk.pooled_then_rescore`);
        C >= the index's size is the exact search. Ignored with ``exact=True``."""
        k = check_k(k)
        scoring = self.scoring_for(model)
        q = (queries.detach().cpu().float() if torch.is_tensor(queries)
             else torch.as_tensor(np.asarray(queries, dtype=np.float32)))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"queries have shape {tuple(q.shape)}, the index {self.path} takes (Q, {self.dim})")
        if not bool(torch.isfinite(q).all()):
            raise ConfigError(f"queries hold NaN or inf values; {self.path} cannot rank videos against them")
        if candidates is not None and self.scoring.ann:
            raise ConfigError(f"--candidates: {self.path} is {self.scoring.label}; candidates then exact re-scoring is for "
                              "indexes scored by the model, frames against the query (cma's query score): use --nprobe/--rerank with its approximate index")
        scores, rows = self.store.search(scoring, q, k, exact=exact,
                                         params=SearchParams(nprobe=nprobe, ef_search=ef_search, rerank=rerank,
                                                             candidates=candidates))
        self._check_scores(scores, rows)
        return scores, rows

    def _check_scores(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """A NaN or inf score never leaves the index: it means damaged embeddings (or model weights)."""
        bad = ~np.isfinite(scores) & (rows >= 0)
        if bad.any():
            q, j = map(int, np.argwhere(bad)[0])
            r = int(rows[q, j])
            vid = self.entries[r]["id"] if 0 <= r < len(self.entries) else "?"
            where = self.store.where()
            why = ("its embeddings were not verified (verify=False / --no-verify): the file is probably damaged"
                   if not self.verified else "the model's weights or the file may be damaged")
            raise DataError(f"{where}: video {vid!r} (row {r}) scored {float(scores[q, j])} (not a number): {why}; "
                            f"rebuild the index: {rebuild_command(self.path, self.meta)}")

    @property
    def emb(self) -> np.ndarray:
        """The rows (N, *row_shape) float32 (a Milvus store: fetched from the collection, N x D floats)."""
        if isinstance(self.store, FaissStore):
            return self.store.emb
        return self.store.vectors(np.arange(len(self.entries)))

    @property
    def emb_tensor(self) -> torch.Tensor:
        return self._faiss_store().emb_tensor

    def gallery_cache(self, model: Any) -> torch.Tensor | None:
        """The scoring's ``cache`` of every stored row (``model``: a model or its scoring; cma: the F x F frame
        Gram matrices, N x F^2 float32: 0.58 GB at 1M videos, F = 12), computed once on first use and kept,
        so that a query costs N x F x D multiply-adds instead of N x F x (F + 1) x D. None when the scoring
        keeps no per-row work."""
        return self._faiss_store().row_cache(model if isinstance(model, Scoring) else model.scoring)


def kind_mismatch(index: Path, stored: StoredScoring, checkpoint: Any, scoring: Scoring, method: str,
                  meta: dict | None = None) -> str:
    """The message refusing a model (of ``checkpoint``, if known) whose kind of scores differs from the index's."""
    model = meta.get("model") if isinstance(meta, dict) else None
    built = model.get("checkpoint") if isinstance(model, dict) else None
    what = f"the checkpoint {checkpoint} ({method})" if checkpoint is not None else f"the model ({method})"
    return (f"{index}: {stored.label}, but {what} is {scoring.label}: they cannot be mixed, its scores cannot be computed "
            f"from these embeddings; search it with the checkpoint it was built with{f' ({built})' if built else ''}, or "
            f"rebuild the index with this one: {rebuild_command(index, meta, checkpoint if checkpoint is not None else 'CHECKPOINT')}")
