"""Retrieval metrics (R@K, MdR, MnR) for text-video retrieval, plus optional re-ranking.

Conventions
-----------
- ``sim`` is a (texts x videos) score matrix (torch tensor or numpy array): row ``i`` holds the
  scores of caption ``i`` against every video.
- ``text_to_video[i]`` is the index of caption ``i``'s video. Default: the identity (a square
  matrix, one caption per video). Several captions per video are allowed; every video must have at
  least one caption.
- Tie policy (deterministic, independent of gallery order): ties are broken uniformly at random
  *in expectation*. Two scores are tied when they differ by at most ``tie_rtol`` (default
  ``TIE_RTOL`` = 1e-6) times the largest absolute score of the matrix, not only when they are
  bit-identical: a video and its time-reversed copy under frame averaging get scores that differ
  by float rounding alone (measured: up to 1.2e-7 on cosines, 1-4 ulps, depending on thread count
  and summation order), and an exact-equality rule would flip between "tie" and "win" from one
  machine to the next. Scores of distinct videos on real data are rarely that close (tests:
  1,000-video CLIP-like float32 matrices get the same R@K and MdR with and without the tolerance,
  MnR within 0.002; a tie of 1e-6 x max|score| is ~10 float32 ulps of a cosine). The tolerance is relative, so a matrix multiplied by a logit scale ranks the same;
  ``tie_rtol=0`` gives exact-equality ties. A ground truth with ``b`` candidates scoring strictly higher and ``t``
  other candidates scoring exactly the same has an optimistic rank ``b + 1`` (what the rank
  functions return) and a uniformly random position in the tied block; R@K is the probability of
  landing within K, MnR / MdR use the expected rank ``b + 1 + t / 2``. So a degenerate model that
  scores everything equally gets chance-level R@1 (100 / gallery size), and two gallery items a
  model cannot tell apart (e.g. a video and its time-reversed copy under frame averaging) are a
  coin flip, not a double hit. Without ties this is the usual ``1 + #strictly higher`` rank.
- t2v: each caption is a query; its rank is that of its video among all videos.
- v2t: each video is a query; it is correct as soon as any of its captions is retrieved, so its
  rank is ``1 + (number of captions scoring strictly higher than its best-scoring caption)``; with
  ties, the first of its ``g`` tied captions lands after ``t / (g + 1)`` tied others on average.
- R@K is in percent; MdR is ``np.median`` of the ranks (the mean of the two middle ranks for an
  even number of queries, so it can be x.5); MnR is the mean rank.

Everything is vectorised and streams over row blocks of ``chunk`` captions, so only a
(chunk x videos) boolean block is alive at a time.

Post-processing (optional, never part of the paper's numbers)
-------------------------------------------------------------
``dual_softmax`` (DSL) and ``qb_norm`` (QB-Norm) re-score a similarity matrix before ranking.
Both are *direction-specific*: re-score with the axis of the queries you rank, e.g.::

    t2v = retrieval_metrics(dual_softmax(sim, 100.0, dim=0), t2v_index)["t2v"]
    v2t = retrieval_metrics(dual_softmax(sim, 100.0, dim=1), t2v_index)["v2t"]

Their hyperparameters come from the config and must never be tuned on the test split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "TIE_RTOL",
    "tie_tolerance",
    "retrieval_metrics",
    "rank_metrics",
    "t2v_ranks",
    "v2t_ranks",
    "similarity_chunked",
    "dual_softmax",
    "qb_norm",
]


#: scores within this fraction of the matrix's largest |score| count as tied (module docstring)
TIE_RTOL = 1e-6


def tie_tolerance(sim, rtol: float = TIE_RTOL) -> float:
    """The absolute tolerance under which two scores of ``sim`` count as tied."""
    if rtol < 0:
        raise ValueError(f"tie_rtol must be >= 0, got {rtol}")
    sim = _as_tensor(sim)
    if rtol == 0 or sim.numel() == 0:
        return 0.0
    scale = sim.abs().max()
    if sim.is_floating_point() and not torch.isfinite(scale):  # +-inf scores (masked entries): scale by the rest
        finite = sim[torch.isfinite(sim)]
        scale = finite.abs().max() if finite.numel() else torch.zeros(())
    return float(rtol * scale.item())


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))


def _check_sim(sim) -> torch.Tensor:
    sim = _as_tensor(sim)
    if sim.ndim != 2:
        raise ValueError(f"the similarity matrix must be 2-D (texts x videos), got shape {tuple(sim.shape)}")
    if sim.is_floating_point() and torch.isnan(sim).any():
        raise ValueError("the similarity matrix contains NaN: ranks would be meaningless")
    return sim


def _check_index(sim: torch.Tensor, text_to_video) -> torch.Tensor:
    n_text, n_video = sim.shape
    if text_to_video is None:
        if n_text != n_video:
            raise ValueError(f"a {n_text} x {n_video} similarity matrix needs text_to_video "
                             "(the default pairs caption i with video i)")
        return torch.arange(n_text, device=sim.device)
    idx = text_to_video if torch.is_tensor(text_to_video) else torch.as_tensor(np.asarray(text_to_video))
    if idx.ndim != 1 or len(idx) != n_text or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"text_to_video must be {n_text} integers (one video per text), "
                         f"got shape {tuple(idx.shape)} of {idx.dtype}")
    idx = idx.long().to(sim.device)
    if n_text and (idx.min() < 0 or idx.max() >= n_video):
        raise ValueError(f"text_to_video holds indices outside [0, {n_video})")
    covered = torch.zeros(n_video, dtype=torch.bool, device=sim.device)
    covered[idx] = True
    if not covered.all():
        missing = (~covered).nonzero().flatten()[:10].tolist()
        raise ValueError(f"{int((~covered).sum())} video(s) have no caption (first: {missing}); "
                         "drop them from the gallery or add their captions")
    return idx


def t2v_ranks(sim, text_to_video=None, chunk: int = 1024, *, ties: bool = False, tie_rtol: float = TIE_RTOL):
    """Optimistic rank (1 + number of videos scoring higher, beyond the tie tolerance) of each
    caption's video: shape (texts,). With ``ties=True`` also returns how many *other* videos are
    tied with it (pass both to :func:`rank_metrics` for the tie-aware metrics)."""
    sim = _check_sim(sim)
    ranks, tied = _t2v_ranks(sim, _check_index(sim, text_to_video), chunk, tie_tolerance(sim, tie_rtol))
    return (ranks, tied) if ties else ranks


def _t2v_ranks(sim: torch.Tensor, idx: torch.Tensor, chunk: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = torch.empty(sim.shape[0], dtype=torch.long)
    tied = torch.empty(sim.shape[0], dtype=torch.long)
    for s in range(0, sim.shape[0], chunk):
        block = sim[s:s + chunk]
        gt = block.gather(1, idx[s:s + chunk, None])  # (b, 1)
        if tol:
            above, level = block > gt + tol, (block - gt).abs() <= tol
        else:
            above, level = block > gt, block == gt
        ranks[s:s + chunk] = (above.sum(1) + 1).cpu()
        tied[s:s + chunk] = (level.sum(1) - 1).cpu()  # minus the ground truth itself
    return ranks, tied


def v2t_ranks(sim, text_to_video=None, chunk: int = 1024, *, ties: bool = False, tie_rtol: float = TIE_RTOL):
    """Optimistic rank of each video's best-scoring caption among all captions: shape (videos,).
    With ``ties=True`` also returns (other videos' captions tied with it, its own captions tied at
    that score)."""
    sim = _check_sim(sim)
    ranks, tied, own = _v2t_ranks(sim, _check_index(sim, text_to_video), chunk, tie_tolerance(sim, tie_rtol))
    return (ranks, tied, own) if ties else ranks


def _v2t_ranks(sim: torch.Tensor, idx: torch.Tensor, chunk: int,
               tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_text, n_video = sim.shape
    gt = sim[torch.arange(n_text, device=sim.device), idx]  # score of each caption with its video
    best = torch.full((n_video,), float("-inf"), dtype=gt.dtype if gt.is_floating_point() else torch.float64,
                      device=sim.device)
    best = best.scatter_reduce(0, idx, gt.to(best.dtype), reduce="amax")
    own = torch.zeros(n_video, dtype=torch.long, device=sim.device)
    own.index_add_(0, idx, (gt.to(best.dtype) >= best[idx] - tol).long())  # own captions tied at the best score
    above = torch.zeros(n_video, dtype=torch.long, device=sim.device)
    level = torch.zeros(n_video, dtype=torch.long, device=sim.device)
    for s in range(0, n_text, chunk):
        block = sim[s:s + chunk]
        if tol:
            above += (block > best + tol).sum(0)
            level += ((block - best).abs() <= tol).sum(0)
        else:
            above += (block > best).sum(0)
            level += (block == best).sum(0)
    return (above + 1).cpu(), (level - own).cpu(), own.cpu()


def rank_metrics(ranks, ks: Sequence[int] = (1, 5, 10), tied=None, own=None) -> dict[str, float]:
    """R@K (percent) for each K, MdR (np.median semantics) and MnR from 1-based optimistic ranks.

    ``tied`` (optional, per query): other candidates scoring exactly like the ground truth;
    ``own`` (optional, v2t): the query's own correct candidates in that tied block (default 1).
    With them every metric is its expectation under uniformly random tie-breaking (module docstring);
    without them there are no ties and the ranks are exact.
    """
    r = np.asarray(ranks.cpu() if torch.is_tensor(ranks) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to summarise (empty gallery or no queries)")
    t = np.zeros_like(r) if tied is None else np.asarray(tied.cpu() if torch.is_tensor(tied) else tied, dtype=np.float64)
    g = np.ones_like(r) if own is None else np.asarray(own.cpu() if torch.is_tensor(own) else own, dtype=np.float64)
    if t.shape != r.shape or g.shape != r.shape:
        raise ValueError(f"ranks, tied and own must have the same shape, got {r.shape}, {t.shape}, {g.shape}")
    out = {f"R{k}": float(100.0 * np.mean(_hit_probability(r, t, g, k))) for k in ks}
    expected = r + t / (g + 1.0)  # expected rank of the first correct item in a random tie order
    out["MdR"] = float(np.median(expected))
    out["MnR"] = float(np.mean(expected))
    return out


def _lgamma(x: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _hit_probability(r: np.ndarray, t: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """P(one of ``g`` correct items is among the first ``m = k - r + 1`` places of a uniformly
    shuffled block of ``g + t`` tied items) = 1 - C(t, m) / C(t + g, m)."""
    m = k - r + 1
    p = np.zeros_like(r)
    sure = m > t  # more places than wrong items: certain hit
    p[sure] = 1.0
    mid = (m >= 1) & ~sure
    if mid.any():
        mm, tt, gg = m[mid], t[mid], g[mid]
        log_ratio = (_lgamma(tt + 1) - _lgamma(tt - mm + 1)) - (_lgamma(tt + gg + 1) - _lgamma(tt + gg - mm + 1))
        p[mid] = 1.0 - np.exp(log_ratio)
    return p


def retrieval_metrics(sim, text_to_video=None, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                      tie_rtol: float = TIE_RTOL) -> dict:
    """Text-to-video and video-to-text metrics of a (texts x videos) score matrix.

    Returns ``{"t2v": {...}, "v2t": {...}}``, each with ``R1, R5, R10`` (percent), ``MdR`` and
    ``MnR`` (floats). Rank of a ground truth = 1 + number of candidates scoring higher, ties (scores
    within ``tie_rtol`` x the largest |score|) broken uniformly at random in expectation (module docstring). MdR uses
    ``np.median`` (even count: mean of the two middle ranks). v2t uses each video's best-ranked caption. Raises ValueError for NaN scores, a bad
    ``text_to_video`` or a video without captions.
    """
    sim = _check_sim(sim)
    idx = _check_index(sim, text_to_video)
    tol = tie_tolerance(sim, tie_rtol)
    ranks, tied = _t2v_ranks(sim, idx, chunk, tol)
    v_ranks, v_tied, v_own = _v2t_ranks(sim, idx, chunk, tol)
    return {"t2v": rank_metrics(ranks, ks, tied), "v2t": rank_metrics(v_ranks, ks, v_tied, v_own)}


def similarity_chunked(text_emb, video_emb, chunk: int = 1024) -> torch.Tensor:
    """``text_emb @ video_emb.T`` as a float32 CPU tensor, computed ``chunk`` text rows at a time.

    Inputs may live on a GPU: each (chunk x videos) block is computed there and moved to the CPU,
    so the full matrix never sits on the device. Pass L2-normalised embeddings for cosine scores.
    """
    t, v = _as_tensor(text_emb), _as_tensor(video_emb)
    if t.ndim != 2 or v.ndim != 2 or t.shape[1] != v.shape[1]:
        raise ValueError(f"embeddings must be (n, d) with the same d, got {tuple(t.shape)} and {tuple(v.shape)}")
    v = v.float().T
    out = torch.empty(t.shape[0], v.shape[1], dtype=torch.float32)
    with torch.no_grad():
        for s in range(0, t.shape[0], chunk):
            out[s:s + chunk] = (t[s:s + chunk].float() @ v).cpu()
    return out


# ---------------------------------------------------------------------------------------------
# Optional post-processing (re-scoring before ranking). Not used by the paper's numbers.
# ---------------------------------------------------------------------------------------------

def dual_softmax(sim, temperature: float = 100.0, dim: int = 0) -> torch.Tensor:
    """Dual Softmax inference re-scoring (DSL; Cheng et al. 2021, "Improving Video-Text Retrieval
    by Multi-Stream Corpus Alignment and Dual Softmax Loss", arXiv:2109.04290).

    POST-PROCESSING, optional: ``out = sim * softmax(temperature * sim, dim=dim)``.

    ``dim`` is the axis of the *other* modality than the gallery: for t2v (captions are queries,
    rows) the softmax runs over captions, ``dim=0``, i.e. a video's score for a caption is weighted
    by how much that caption stands out among all captions for that video; for v2t use ``dim=1``.
    ``temperature`` *multiplies* the scores (an inverse temperature, like CLIP's logit scale): with
    cosine similarities, 100 is the value of the public CLIP-based implementations
    (``sims * softmax(sims * 100, axis=0)``, X-Pool/T-MASS); CAMoE's loss writes
    ``logits * softmax(logits / 1000)`` on logits = 100 * cosine. Returns a float tensor of the
    same shape. Note it uses all test queries jointly (transductive), which is why it is opt-in.
    """
    sim = _check_sim(sim).float()
    return sim * torch.softmax(temperature * sim, dim=dim)


def qb_norm(sim_test, sim_querybank, k: int = 1, beta: float = 20.0) -> torch.Tensor:
    """Querybank Normalisation with the Dynamic Inverted Softmax (QB-Norm; Bogolin et al. 2022,
    "Cross Modal Retrieval with Querybank Normalisation", CVPR, arXiv:2112.12777).

    POST-PROCESSING, optional. Queries are rows:
    - ``sim_test``: (test queries x gallery), the matrix to re-score.
    - ``sim_querybank``: (bank queries x the same gallery). The bank must be *training* queries
      (e.g. training captions against the test videos), never the test queries: that is why it is a
      separate argument, and passing the test matrix itself raises ValueError.
    Activation set A = the gallery items in the top-``k`` of at least one bank query (ties broken
    by ``torch.topk``). A test row whose top-1 item (first index on ties) is in A is re-scored as
    ``beta * s_ij - logsumexp_q(beta * bank_qj)``, the log of the inverted softmax
    ``exp(beta s_ij) / sum_q exp(beta bank_qj)`` (log-space avoids overflow; within a row the
    ranking is the same). Other rows are returned unchanged. Only row-wise rankings are
    meaningful afterwards: for v2t pass ``sim.T`` with a bank of training videos vs test captions.
    ``beta`` = 20 and ``k`` = 1 are the paper's defaults for cosine similarities.
    """
    test, bank = _check_sim(sim_test).float(), _check_sim(sim_querybank).float()
    if sim_querybank is sim_test or (bank.shape == test.shape and torch.equal(bank, test)):
        raise ValueError("the querybank must be built from training queries, not the test queries")
    if bank.shape[1] != test.shape[1]:
        raise ValueError(f"querybank covers {bank.shape[1]} gallery items, the test matrix {test.shape[1]}")
    if not 1 <= k <= test.shape[1]:
        raise ValueError(f"k must be in [1, {test.shape[1]}], got {k}")
    active = torch.zeros(bank.shape[1], dtype=torch.bool, device=bank.device)
    active[bank.topk(k, dim=1).indices.flatten()] = True
    rows = active.to(test.device)[test.argmax(dim=1)]
    norm = beta * test - torch.logsumexp(beta * bank, dim=0).to(test.device)
    return torch.where(rows[:, None], norm, test)
