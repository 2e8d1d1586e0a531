"""Retrieval metrics (R@K, MdR, MnR) for text-video retrieval, plus optional re-ranking.

Conventions
-----------
- ``sim`` is a (texts x videos) score matrix (torch tensor or numpy array): row ``i`` holds the
  scores of caption ``i`` against every video.
- ``text_to_video[i]`` is the index of caption ``i``'s video. Default: the identity (a square
  matrix, one caption per video). Several captions per video are allowed; every video must have at
  least one caption.
- Tie policy (deterministic, independent of gallery order): the rank of a ground truth is
  ``1 + (number of candidates scoring strictly higher)``. Candidates with exactly the same score
  as the ground truth do not push it down; this is the optimistic convention, so a degenerate
  model that scores everything equally gets rank 1 everywhere (watch for collapsed embeddings).
- t2v: each caption is a query; its rank is that of its video among all videos.
- v2t: each video is a query; it is correct as soon as any of its captions is retrieved, so its
  rank is ``1 + (number of captions scoring strictly higher than its best-scoring caption)``.
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
    "retrieval_metrics",
    "rank_metrics",
    "t2v_ranks",
    "v2t_ranks",
    "similarity_chunked",
    "dual_softmax",
    "qb_norm",
]


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


def t2v_ranks(sim, text_to_video=None, chunk: int = 1024) -> torch.Tensor:
    """Rank (1-based, tie policy above) of each caption's video among all videos: shape (texts,)."""
    sim = _check_sim(sim)
    return _t2v_ranks(sim, _check_index(sim, text_to_video), chunk)


def _t2v_ranks(sim: torch.Tensor, idx: torch.Tensor, chunk: int) -> torch.Tensor:
    ranks = torch.empty(sim.shape[0], dtype=torch.long)
    for s in range(0, sim.shape[0], chunk):
        block = sim[s:s + chunk]
        gt = block.gather(1, idx[s:s + chunk, None])  # (b, 1)
        ranks[s:s + chunk] = ((block > gt).sum(1) + 1).cpu()
    return ranks


def v2t_ranks(sim, text_to_video=None, chunk: int = 1024) -> torch.Tensor:
    """Rank of each video's best-scoring caption among all captions: shape (videos,)."""
    sim = _check_sim(sim)
    return _v2t_ranks(sim, _check_index(sim, text_to_video), chunk)


def _v2t_ranks(sim: torch.Tensor, idx: torch.Tensor, chunk: int) -> torch.Tensor:
    n_text, n_video = sim.shape
    gt = sim[torch.arange(n_text, device=sim.device), idx]  # score of each caption with its video
    best = torch.full((n_video,), float("-inf"), dtype=gt.dtype if gt.is_floating_point() else torch.float64,
                      device=sim.device)
    best = best.scatter_reduce(0, idx, gt.to(best.dtype), reduce="amax")
    above = torch.zeros(n_video, dtype=torch.long, device=sim.device)
    for s in range(0, n_text, chunk):
        above += (sim[s:s + chunk] > best).sum(0)
    return (above + 1).cpu()


def rank_metrics(ranks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K (percent) for each K, MdR (np.median semantics) and MnR from 1-based ranks."""
    r = np.asarray(ranks.cpu() if torch.is_tensor(ranks) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to summarise (empty gallery or no queries)")
    out = {f"R{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def retrieval_metrics(sim, text_to_video=None, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Text-to-video and video-to-text metrics of a (texts x videos) score matrix.

    Returns ``{"t2v": {...}, "v2t": {...}}``, each with ``R1, R5, R10`` (percent), ``MdR`` and
    ``MnR`` (floats). Rank of a ground truth = 1 + number of candidates scoring *strictly* higher
    (ties never count against it). MdR uses ``np.median`` (even count: mean of the two middle
    ranks). v2t uses each video's best-ranked caption. Raises ValueError for NaN scores, a bad
    ``text_to_video`` or a video without captions.
    """
    sim = _check_sim(sim)
    idx = _check_index(sim, text_to_video)
    return {"t2v": rank_metrics(_t2v_ranks(sim, idx, chunk), ks),
            "v2t": rank_metrics(_v2t_ranks(sim, idx, chunk), ks)}


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
