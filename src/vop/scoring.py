"""How a model scores texts against videos: one small object, ``model.scoring``, that everything reads.

A model's ``encode_video`` gives each video a *gallery representation*, and its :class:`Scoring` says
what that is and how texts are scored against it. Training (the contrastive loss), the evaluation
(the texts x videos matrix), ``vop index`` (what is stored per video) and ``vop search`` (top-k) all
go through it; none of them asks which kind of model it holds.

- :class:`CosineScoring` (kind ``"cosine"``), every dual encoder's (the base class's): a row is one
  L2-normalised vector per video, a query one L2-normalised text vector, a score their dot product.
  An approximate inner-product index (FAISS) can answer top-k for it.
- :class:`FrameScoring`, the base of scorings that keep a video's per-frame embeddings (a row (F, D))
  and score each text against all of them: Cross-Modal Adapter's query score (``vop.methods.cma``,
  kind ``"qscore"``: frames pooled by softmax weights that depend on the text). No vector per video:
  search is exact, in bounded blocks, with an optional per-video ``cache`` (cma: the F x F Gram
  matrices).

A method that scores differently returns another :class:`Scoring` from its ``scoring`` property
(docs/methods.md, "Adding a method"): usually a :class:`FrameScoring` subclass with its own ``kind``,
``score`` and, if it helps, ``cache``. Nothing in the engine or the retrieval changes.

Sits below the methods, the engine and the retrieval: imports torch only.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = ["Scoring", "CosineScoring", "FrameScoring", "BLOCK_BYTES", "SEARCH_ROWS", "block_sizes", "builtin_scoring",
           "index_label"]

#: the most bytes the intermediates of one (queries x rows) block may take per tensor (float32); a
#: frame scoring's block is queries x videos x frames, and cma's query score holds about five such
#: tensors at once, so ~5 x this at peak
BLOCK_BYTES = 64 << 20

#: rows per block of the cosine scoring's top-k search (all queries at once): 2^18 x Q scores
SEARCH_ROWS = 1 << 18


def block_sizes(queries: int, rows: int, pair_bytes: int, max_bytes: int | None = None,
                query_chunk: int = 256) -> tuple[int, int]:
    """(queries, rows) per block so that one queries x rows tensor of ``pair_bytes`` per pair stays
    within ``max_bytes`` (default :data:`BLOCK_BYTES`; at least one of each): up to ``query_chunk``
    queries, then as many rows as fit."""
    max_bytes = max_bytes or BLOCK_BYTES
    pair_bytes = max(pair_bytes, 1)
    qc = max(1, min(queries, query_chunk, max_bytes // pair_bytes))
    rc = max(1, min(max(rows, 1), max_bytes // (pair_bytes * qc)))
    return qc, rc


def _at_least_float32(*ts: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class Scoring:
    """What a model stores per video and how it scores texts against it. Subclasses set ``kind`` and
    define ``row_shape``, ``rows``, ``queries`` and ``score``; the rest has defaults.

    Shapes: a *row* is one video's stored representation (``row_shape``: ``(D,)`` or ``(F, D)``);
    ``rows`` (N, *row_shape); ``queries`` (Q, D). Scores are unscaled (cosines for the built-in
    kinds; logits are ``logit_scale`` times them) and computed in at least float32."""

    #: recorded in index.json (``scoring.kind``); an index is searched only by a model of its kind
    kind: ClassVar[str] = ""
    #: what a row is, for messages ("one vector per video", "per-frame embeddings")
    rows_label: ClassVar[str] = "one vector per video"
    #: why no approximate (FAISS) index can answer for this scoring; None (the cosine's): one can, the
    #: score being the inner product of the query and a single stored vector
    no_ann: ClassVar[str | None] = ("scores each query against what it stores of every video (not the inner product "
                                    "of two vectors), so search is exact")

    # -- what a model defines ------------------------------------------------------------------------
    def row_shape(self, frames: int, dim: int) -> tuple[int, ...]:
        """The shape of one video's row for ``frames`` frames per video and embedding size ``dim``."""
        raise NotImplementedError

    def rows(self, video: torch.Tensor) -> torch.Tensor:
        """A batch of ``encode_video`` outputs -> the rows to store (and to score)."""
        raise NotImplementedError

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        """A batch of ``encode_text`` outputs (Q, D) -> the queries to score."""
        raise NotImplementedError

    def score(self, queries: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        """(Q, D) queries x (N, *row_shape) rows -> (Q, N) scores, unscaled; differentiable (the training
        loss uses it). Any block of queries x block of rows gives that block of the full matrix.
        ``cache``: :meth:`cache` of these rows (aligned with them), if the caller keeps it."""
        raise NotImplementedError

    def cache(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Work on the rows alone that :meth:`score` can reuse across queries (one entry per row, so a
        gallery slices it with the rows), or None."""
        return None

    def logits(self, queries: torch.Tensor, rows: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """The training loss's (Q, N) float32 logits: ``logit_scale`` times :meth:`score`."""
        return logit_scale * self.score(queries, rows).float()

    def pair_bytes(self, row_shape: tuple[int, ...]) -> int:
        """Bytes of the largest intermediate tensor per (query, row) pair of :meth:`score` (float32)."""
        return 4 * math.prod(row_shape[:-1])

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def ann(self) -> bool:
        """Whether an approximate inner-product index (FAISS) over the rows answers for this scoring."""
        return self.no_ann is None

    @property
    def label(self) -> str:
        """What a model of this scoring is, for messages."""
        return f"a model scoring {self.rows_label} ({self.kind})"

    def record(self, frames: int, dim: int) -> dict:
        """What an index records of it (index.json's ``scoring``)."""
        return {"kind": self.kind, "row_shape": list(self.row_shape(frames, dim)), "ann": self.ann}

    def check(self, queries: torch.Tensor, rows: torch.Tensor) -> None:
        """A ValueError unless ``queries`` (Q, D) and ``rows`` (N, *row_shape) fit together."""
        if queries.dim() != 2 or rows.dim() < 2 or queries.shape[-1] != rows.shape[-1]:
            raise ValueError(f"{self.kind} scores need queries (Q, D) and rows (N, ..., D), got "
                             f"{tuple(queries.shape)} and {tuple(rows.shape)}")

    def blocks(self, queries: int, rows: int, row_shape: tuple[int, ...], max_bytes: int | None = None,
               query_chunk: int | None = None) -> tuple[int, int]:
        """(queries, rows) per block of a scan over a gallery (the evaluation's matrix, a search's top-k):
        :func:`block_sizes` with this scoring's :meth:`pair_bytes`."""
        return block_sizes(queries, rows, self.pair_bytes(row_shape), max_bytes, query_chunk or 256)

    @torch.no_grad()
    def matrix(self, queries: torch.Tensor, rows: torch.Tensor, *, device: torch.device | str | None = None,
               max_bytes: int | None = None, query_chunk: int | None = None) -> torch.Tensor:
        """The (Q, N) score matrix, built block by block (:meth:`blocks`) on ``device`` (default: where the
        queries are) and gathered on the CPU, so that no intermediate over ``max_bytes`` exists; the
        queries x rows matrix is the only full-size result. Its dtype: at least float32 (float64 stays
        float64). A small ``max_bytes`` goes down to one query x one row per block (never below)."""
        self.check(queries, rows)
        Q, N = queries.shape[0], rows.shape[0]
        dev = torch.device(device) if device is not None else queries.device
        out_dtype = _at_least_float32(queries, rows)
        out = torch.empty(Q, N, dtype=out_dtype)
        if Q == 0 or N == 0:
            return out
        qc, rc = self.blocks(Q, N, tuple(rows.shape[1:]), max_bytes, query_chunk)
        for r0 in range(0, N, rc):
            r = rows[r0:r0 + rc].to(dev)
            for q0 in range(0, Q, qc):
                out[q0:q0 + qc, r0:r0 + rc] = self.score(queries[q0:q0 + qc].to(dev), r).to(out_dtype).cpu()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"


class CosineScoring(Scoring):
    """A dual encoder's: one L2-normalised vector per video, L2-normalised queries, dot products."""

    kind = "cosine"
    rows_label = "one vector per video"
    no_ann = None

    @property
    def label(self) -> str:
        return "a dual-encoder model (one vector per video)"

    def row_shape(self, frames: int, dim: int) -> tuple[int, ...]:
        return (dim,)

    def rows(self, video: torch.Tensor) -> torch.Tensor:
        return F.normalize(video, dim=-1)

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(text, dim=-1)

    def score(self, queries: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        dtype = _at_least_float32(queries, rows)
        return queries.to(dtype) @ rows.to(dtype).t()

    def logits(self, queries: torch.Tensor, rows: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # the scale multiplies the queries before the product (as CLIP's training code does): keeps the
        # seeded training step's numbers bit for bit
        return logit_scale * queries.float() @ rows.float().t()

    def check(self, queries: torch.Tensor, rows: torch.Tensor) -> None:
        if queries.dim() != 2 or rows.dim() != 2 or queries.shape[1] != rows.shape[1]:
            raise ValueError(f"embeddings must be (n, d) with the same d, got {tuple(queries.shape)} and "
                             f"{tuple(rows.shape)}")

    def blocks(self, queries: int, rows: int, row_shape: tuple[int, ...], max_bytes: int | None = None,
               query_chunk: int | None = None) -> tuple[int, int]:
        """All queries at once, :data:`SEARCH_ROWS` rows per block (or as many as ``max_bytes`` allows)."""
        qc = max(1, min(queries, query_chunk) if query_chunk else queries)
        rc = SEARCH_ROWS if max_bytes is None else max(1, max_bytes // (4 * qc))
        return qc, rc

    @torch.no_grad()
    def matrix(self, queries: torch.Tensor, rows: torch.Tensor, *, device: torch.device | str | None = None,
               max_bytes: int | None = None, query_chunk: int | None = None) -> torch.Tensor:
        """``queries @ rows.T`` as a float32 CPU tensor, ``query_chunk`` (1024) queries at a time, where the
        embeddings are (``device`` and ``max_bytes`` do not apply: one product per block of queries, the
        same as :func:`vop.engine.metrics.similarity_chunked`)."""
        self.check(queries, rows)
        chunk = query_chunk or 1024
        v = rows.float().T
        out = torch.empty(queries.shape[0], v.shape[1], dtype=torch.float32)
        for s in range(0, queries.shape[0], chunk):
            out[s:s + chunk] = (queries[s:s + chunk].float() @ v).cpu()
        return out


class FrameScoring(Scoring):
    """Scores a text against every frame of a video: a row is the video's raw per-frame embeddings
    (F, D), as ``encode_video`` returns them (neither pooled nor normalised), a query the raw text
    embedding. Subclasses set ``kind`` and define ``score`` (and ``cache`` if work on the frames alone
    can be kept). Blocks are bounded by queries x videos x frames float32 values."""

    rows_label = "per-frame embeddings"
    no_ann = ("scores the frames of every video per query (text-conditioned pooling): there is no single vector "
              "per video for an approximate nearest-neighbour index, so search is exact")

    @property
    def label(self) -> str:
        return f"a pairwise model (per-frame, text-conditioned scores: {self.kind})"

    def row_shape(self, frames: int, dim: int) -> tuple[int, ...]:
        return (frames, dim)

    def rows(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 3:
            raise ValueError(f"{self.kind} scores per-frame video embeddings (V, F, D), got {tuple(video.shape)} "
                             "(this model's encode_video returns frames; do not pool or normalise them)")
        return video

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        return text

    def check(self, queries: torch.Tensor, rows: torch.Tensor) -> None:
        if queries.dim() != 2 or rows.dim() != 3 or queries.shape[-1] != rows.shape[-1]:
            raise ValueError(f"{self.kind} scores need text (T, D) and per-frame video embeddings (V, F, D), got "
                             f"{tuple(queries.shape)} and {tuple(rows.shape)}")

    def pair_bytes(self, row_shape: tuple[int, ...]) -> int:
        return 4 * max(row_shape[0], 1)


#: the kinds whose scores need no model (an index of them can be searched with its rows alone)
_BUILTIN: dict[str, type[Scoring]] = {CosineScoring.kind: CosineScoring}


def builtin_scoring(kind: str) -> Scoring | None:
    """The scoring of ``kind`` if it needs no model (``"cosine"``), else None."""
    cls = _BUILTIN.get(kind)
    return cls() if cls is not None else None


def index_label(kind: str, row_shape: tuple[int, ...]) -> str:
    """What an index of ``kind`` rows of ``row_shape`` is, for messages."""
    if kind == CosineScoring.kind:
        return "a dual-encoder index (one vector per video)"
    rows = "per-frame embeddings" if len(row_shape) == 2 else f"rows of shape {tuple(row_shape)}"
    return f"a pairwise index ({rows}, scored by the model's text-conditioned similarity: {kind})"
