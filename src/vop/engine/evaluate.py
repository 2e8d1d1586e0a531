"""Evaluation: encode captions and the gallery once, chunked similarity, the paper's metrics.

Each unique video is decoded and encoded once (test sampling); captions are encoded in batches.
Gallery videos that cannot be decoded are left out and reported (never replaced by zeros): their
captions are removed from the queries and the count is in the result.

What is kept per caption and per video, and how the texts x videos matrix is computed, is the model's
``scoring``'s (:mod:`vop.scoring`): a dual encoder's normalised embeddings and one matrix product per
block of 1024 captions; cma's query score keeps the raw text (T, D) and per-frame video embeddings
(V, F, D) and scores them in blocks of bounded size (never a texts x videos x frames tensor of the
whole gallery). Everything downstream (metrics, DSL / QB-Norm, the demo's diagnostics) reads that matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from vop.data.dataset import VideoTextDataset
from vop.engine.metrics import dual_softmax, qb_norm, retrieval_metrics
from vop.errors import DataError
from vop.methods.base import VideoTextModel
# the batched encoders are vop.runtime's (shared with vop.retrieval); importable from here as before
from vop.runtime import autocast_dtype, encode_texts, encode_videos

__all__ = ["evaluate", "EvalOutput", "postprocess_similarity", "coverage_line", "autocast_dtype", "encode_texts",
           "encode_videos"]


def _refuse_partial(dataset: VideoTextDataset, failures: dict[str, str] | None = None) -> None:
    c = dataset.coverage()
    if not c["partial"]:
        return
    why = ", ".join(f"{n} {k}" for k, n in sorted(c["left_out_why"].items()))
    example = (next(iter((failures or {}).values()), None) or next(iter(dataset.dropped.values()))).rstrip(".")
    raise DataError(
        f"{dataset.name} {dataset.split}: {c['left_out_videos']} of {c['split_videos']} videos ({why}; "
        f"{c['left_out_texts']} of {c['split_texts']} captions) cannot be scored, e.g. {example}; metrics on the rest "
        "are not comparable to the full split: restore them (`vop data verify` lists them all), or pass "
        "--allow-partial to score what is there (every number is then marked partial)")


def coverage_line(m: dict) -> str:
    """"1000 captions, 1000 videos (the whole split)" or what was scored and what was left out, and why."""
    if not m.get("partial"):
        return f"{m['texts']} captions, {m['videos']} videos (the whole split)"
    why = ", ".join(f"{n} {k}" for k, n in sorted(m["left_out_why"].items()))
    return (f"PARTIAL: scored {m['videos']} of {m['split_videos']} videos and {m['texts']} of {m['split_texts']} captions; "
            f"left out {m['left_out_videos']} videos ({why}) and {m['left_out_texts']} captions")


@dataclass
class EvalOutput:
    """``text_emb`` (T, D) and ``video_emb`` (V, *row_shape): the queries and rows of the model's scoring
    (a dual encoder: L2-normalised (T, D), (V, D); cma's query score: raw text (T, D) and per-frame
    (V, F, D) embeddings). ``sim`` (T, V): the unscaled scores."""

    metrics: dict[str, Any]
    text_emb: torch.Tensor
    video_emb: torch.Tensor
    dataset: VideoTextDataset
    sim: torch.Tensor
    failures: dict[str, str] = field(default_factory=dict)


def postprocess_similarity(sim: torch.Tensor, kind: str = "none", *, dsl_temperature: float = 100.0,
                           querybank: torch.Tensor | None = None, qb_k: int = 1, qb_beta: float = 20.0) -> dict[str, torch.Tensor]:
    """Per-direction score matrices (texts x videos) after optional, clearly labelled post-processing.

    DSL normalises over the other axis for each direction; QB-Norm needs a querybank of *training*
    captions against the test gallery (never the test queries).
    """
    if kind == "none":
        return {"t2v": sim, "v2t": sim}
    if kind == "dsl":
        return {"t2v": dual_softmax(sim, dsl_temperature, dim=0), "v2t": dual_softmax(sim, dsl_temperature, dim=1)}
    if kind == "qbnorm":
        if querybank is None:
            raise ValueError("QB-Norm needs a querybank: similarities of training captions to the gallery")
        return {"t2v": qb_norm(sim, querybank, k=qb_k, beta=qb_beta), "v2t": sim}
    raise ValueError(f"unknown post-processing {kind!r} (none, dsl, qbnorm)")


def _similarity(model: VideoTextModel, text_emb: torch.Tensor, video_emb: torch.Tensor,
                device: torch.device | str) -> torch.Tensor:
    """The (texts x videos) float32 CPU score matrix of the model's scoring, in bounded blocks (on
    ``device`` where the scoring computes there)."""
    return model.scoring.matrix(text_emb, video_emb, device=device).float()


def evaluate(model: VideoTextModel, dataset: VideoTextDataset, *, batch_size: int = 16, text_batch_size: int = 256,
             device: torch.device | str = "cpu", num_workers: int = 0, max_words: int | None = 32, precision: str = "auto",
             postprocess: str = "none", dsl_temperature: float = 100.0, querybank_captions: Sequence[str] | None = None,
             qb_k: int = 1, qb_beta: float = 20.0, progress: bool = False, allow_partial: bool = True) -> EvalOutput:
    """t2v and v2t R@1/5/10, MdR, MnR of ``model`` on ``dataset`` (several captions per video allowed).

    The metrics also say how much of the split was scored (:meth:`VideoTextDataset.coverage`:
    ``split_videos``, ``split_texts``, ``left_out_videos``, ``left_out_texts``, ``left_out_why``,
    ``partial``). ``allow_partial=False`` refuses (DataError) a gallery with any video of the split
    left out: missing, listed as bad by ``vop data verify``, or unreadable now.
    """
    if not allow_partial:
        _refuse_partial(dataset)
    was_training = model.training
    model.eval()
    try:
        video_emb, ids, failures = encode_videos(model, dataset.video_dataset(), batch_size=batch_size, device=device,
                                                 num_workers=num_workers, precision=precision, progress=progress)
        if failures:
            dataset = dataset.without_videos(failures)
            if not allow_partial:
                _refuse_partial(dataset, failures)
        order = {v: i for i, v in enumerate(ids)}
        video_emb = video_emb[torch.tensor([order[v] for v in dataset.videos], dtype=torch.long)]
        text_emb = encode_texts(model, dataset.captions, batch_size=text_batch_size, device=device, max_words=max_words,
                                precision=precision, progress=progress)
        sim = _similarity(model, text_emb, video_emb, device)
        bank = None
        if postprocess == "qbnorm":
            if not querybank_captions:
                raise ValueError("QB-Norm needs training captions as a querybank")
            bank = _similarity(model, encode_texts(model, querybank_captions, batch_size=text_batch_size, device=device,
                                                   max_words=max_words, precision=precision), video_emb, device)
        sims = postprocess_similarity(sim, postprocess, dsl_temperature=dsl_temperature, querybank=bank, qb_k=qb_k, qb_beta=qb_beta)
        gt = dataset.text_to_video
        metrics = {"t2v": retrieval_metrics(sims["t2v"], gt)["t2v"], "v2t": retrieval_metrics(sims["v2t"], gt)["v2t"],
                   "texts": len(dataset.captions), "videos": len(dataset.videos), "skipped_videos": len(failures),
                   **dataset.coverage(), "postprocess": postprocess}
        return EvalOutput(metrics, text_emb, video_emb, dataset, sim, failures)
    finally:
        model.train(was_training)
