"""Top-k over stored rows: the one place that, given an index's rows, a model's scoring and queries,
answers which videos score best (each store of :mod:`vop.retrieval.store` calls it).

- :func:`top_k`: exact, for any :class:`~vop.scoring.Scoring`: ``scoring.score`` on blocks of queries x
  rows (``scoring.blocks``: a dual encoder's all queries x 2^18 rows; a frame scoring's at most 256
  queries and as many videos as keep the queries x videos x frames intermediates within 64 MiB), only
  the running top k kept, with the scoring's per-row ``cache`` if the caller keeps one.
- :func:`search_rows`: :func:`top_k`, or the approximate (FAISS) index where the scoring allows one and
  the caller has it (``k`` >= the rows: every video, ranked exactly, as by the other kinds), optionally
  re-ranking its ``rerank`` x k candidates exactly.
- :func:`rescore`: candidates then exact re-score: the candidate rows of each query (from an approximate
  index, or any cheaper first stage) scored by the model's scoring, the top k kept. IVF-PQ's compressed
  scores are made exact this way; a scoring without one vector per video can re-rank candidates found
  by another representation of the same videos the same way.

Results: ``(scores (Q, k'), rows (Q, k'))``, ``k' = min(k, N)``, best first, equal scores ordered by row;
scores are the scoring's (unscaled: cosines for the built-in kinds), computed on the CPU.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from vop.errors import ConfigError
from vop.scoring import CosineScoring, Scoring

__all__ = ["top_k", "search_rows", "exact_search", "check_k", "rescore", "pooled_then_rescore", "check_candidates"]


def check_k(k: Any, name: str = "k") -> int:
    """The number of results asked for: an integer >= 1 (more than the index holds gives every video)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (the number of results), got {k!r}")
    return int(k)


def _topk_merge(best_s: torch.Tensor, best_i: torch.Tensor, scores: torch.Tensor, start: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kk = min(k, scores.shape[1])
    v, i = scores.topk(kk, dim=1)
    best_s = torch.cat([best_s, v], 1)
    best_i = torch.cat([best_i, i + start], 1)
    if best_s.shape[1] > k:
        v, j = best_s.topk(k, dim=1)
        best_s, best_i = v, best_i.gather(1, j)
    return best_s, best_i


def _ordered(best_s: torch.Tensor, best_i: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic order: score descending, then row ascending."""
    order = np.lexsort((best_i.numpy(), -best_s.numpy().astype(np.float64)), axis=1)
    return np.take_along_axis(best_s.numpy(), order, 1), np.take_along_axis(best_i.numpy(), order, 1)


@torch.no_grad()
def top_k(scoring: Scoring, rows: torch.Tensor, q: torch.Tensor, k: int, *, cache: torch.Tensor | None = None,
          max_bytes: int | None = None, blocks: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``scoring.score(q (Q, D), rows (N, *row_shape))``, streamed over blocks of queries x
    rows (``blocks``, default ``scoring.blocks(...)`` within ``max_bytes``) so that the full Q x N scores
    never sit in memory, only the running top-k. ``cache``: ``scoring.cache(rows)``, if kept (cma's Gram
    matrices: the same scores, F times less work per query). Best first; ties by row."""
    n, nq = rows.shape[0], q.shape[0]
    k = min(k, n)
    if k == 0 or nq == 0:
        return np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
    qc, rc = blocks or scoring.blocks(nq, n, tuple(rows.shape[1:]), max_bytes)
    scores_out, rows_out = [], []
    for q0 in range(0, nq, qc):
        qt = q[q0:q0 + qc]
        best_s = torch.full((qt.shape[0], 0), float("-inf"))
        best_i = torch.zeros((qt.shape[0], 0), dtype=torch.long)
        for s in range(0, n, rc):
            scores = scoring.score(qt, rows[s:s + rc], cache=None if cache is None else cache[s:s + rc])
            best_s, best_i = _topk_merge(best_s, best_i, scores.float(), s, k)
        sc, rw = _ordered(best_s, best_i)
        scores_out.append(sc)
        rows_out.append(rw)
    if len(scores_out) == 1:
        return scores_out[0], rows_out[0]
    return np.concatenate(scores_out).astype(np.float32, copy=False), np.concatenate(rows_out).astype(np.int64, copy=False)


def exact_search(emb: torch.Tensor, q: torch.Tensor, k: int, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of ``q`` (Q, D) against ``emb`` (N, D) (a dual encoder's normalised
    rows: :func:`top_k` with :class:`~vop.scoring.CosineScoring`), streamed over ``chunk`` rows (so 1M x Q
    scores never sit in memory at once). Best first; equal scores ordered by row."""
    return top_k(CosineScoring(), emb, q, k, blocks=(max(q.shape[0], 1), chunk))


@torch.no_grad()
def rescore(scoring: Scoring, q: torch.Tensor, candidates: np.ndarray, k: int, n: int,
            rows_of: Callable[[np.ndarray], torch.Tensor], cache_of: Callable[[np.ndarray], torch.Tensor | None] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Candidates then exact re-score: ``candidates`` (Q, C) row numbers per query (``-1``: none; repeats
    ignored) scored exactly by ``scoring`` against the queries ``q`` (Q, D); the best ``min(k, n)`` per query,
    best first, ties by row, ``-1`` rows (score ``-inf``) where fewer candidates were given. ``rows_of(rows)``
    gives those rows' stored representation (``cache_of``, the scoring's cache of them, if kept): from memory,
    or fetched from a store."""
    nq, kk = q.shape[0], min(k, n)
    out_s = np.full((nq, kk), -np.inf, np.float32)
    out_r = np.full((nq, kk), -1, np.int64)
    for i in range(nq):
        c = np.unique(candidates[i][candidates[i] >= 0]).astype(np.int64)
        if not len(c):
            continue
        s = scoring.score(q[i:i + 1], rows_of(c), cache=None if cache_of is None else cache_of(c))[0].float().numpy()
        order = np.lexsort((c, -s.astype(np.float64)))[:kk]
        out_s[i, :len(order)], out_r[i, :len(order)] = s[order], c[order]
    return out_s, out_r


def check_candidates(candidates: Any, k: int, n: int) -> int:
    """A number of candidates: an integer >= 1 and at least the results asked for (``min(k, n)``)."""
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ConfigError(f"candidates must be an integer >= 1, got {candidates!r}")
    if candidates < min(k, n):
        raise ConfigError(f"--candidates {candidates} is fewer than the {min(k, n)} results asked for (-k): "
                          f"give at least k candidates (more: a recall nearer the exact search's)")
    return int(candidates)


def pooled_then_rescore(scoring: Scoring, rows: torch.Tensor, pooled: torch.Tensor, q: torch.Tensor, k: int,
                        candidates: int, *, cache: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidates then exact re-score for a scoring without one vector per video (cma's query score): the
    ``candidates`` videos per query whose mean-pooled frame vectors (``pooled`` (N, D), L2-normalised) are nearest
    the normalised query (exact cosine top-C), scored exactly by ``scoring`` (:func:`rescore`, with the gallery
    ``cache`` if kept), the best ``k`` kept. ``candidates`` >= N: every video is a candidate, which is the exact
    search (:func:`top_k`), answered by it. ``candidates`` < ``k``: a ConfigError (fewer than k results)."""
    n = rows.shape[0]
    check_candidates(candidates, k, n)
    if candidates >= n:
        return top_k(scoring, rows, q, k, cache=cache)
    _, cand = top_k(CosineScoring(), pooled, torch.nn.functional.normalize(q.float(), dim=-1), int(candidates))
    return rescore(scoring, q, cand, k, n, lambda c: rows[torch.from_numpy(c)],
                   None if cache is None else (lambda c: cache[torch.from_numpy(c)]))


def search_rows(scoring: Scoring, rows: torch.Tensor, q: torch.Tensor, k: int, *, cache: torch.Tensor | None = None,
                ann: Callable[[], Any] | None = None, exact: bool | None = None, rerank: int = 0,
                rerank_rows: Callable[[np.ndarray], torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows for the queries ``q`` (Q, D): through the approximate index ``ann()`` (a loaded FAISS
    index over ``rows``; given only where the scoring allows one) unless ``exact`` is True or ``k`` covers
    every row, else exactly (:func:`top_k`). ``rerank`` >= 1: the approximate index gives ``rerank`` x k
    candidates, re-scored exactly (:func:`rescore`): exact scores, and a recall that grows with ``rerank``.
    ``rerank_rows(rows)``: a compact copy of those rows (IVF-PQ's float16 ``rerank-G.npy``) to rank the candidates
    by; the k kept are then scored from ``rows`` (exact scores, ordered by them)."""
    n = rows.shape[0]
    if ann is not None and scoring.ann and exact is not True and k < n:
        from vop.retrieval.ann import faiss_search

        if rerank and rerank > 0:
            _, cand = faiss_search(ann(), q.numpy(), min(n, k * int(rerank)))
            cand = cand.astype(np.int64)
            rows_of = lambda c: rows[torch.from_numpy(c)]  # noqa: E731
            cache_of = None if cache is None else (lambda c: cache[torch.from_numpy(c)])
            if rerank_rows is not None:
                _, cand = rescore(scoring, q, cand, k, n, rerank_rows)
            return rescore(scoring, q, cand, k, n, rows_of, cache_of)
        scores, ids = faiss_search(ann(), q.numpy(), k)
        return scores, ids.astype(np.int64)
    return top_k(scoring, rows, q, k, cache=cache)
