"""Symmetric InfoNCE over the (global) batch, and an exact gradient-accumulation scheme.

With several processes the features of every rank are gathered with gradients and every rank
computes the loss over the global batch; DDP's gradient averaging then gives exactly the gradient
of one process on the concatenated batch (tested).

The logits are ``logit_scale * score(text, video)`` over the global batch (B x B), ``score`` the
model's scoring's (``model.scoring.score``, :mod:`vop.scoring`): for a dual encoder the dot products
of the normalised features (the default), for cma's query score the q-score of the raw text (B, D)
against the raw per-frame video embeddings (B, F, D), gathered as they are.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vop.engine.distributed import gather_with_grad
from vop.scoring import CosineScoring, Scoring


Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


_COSINE = CosineScoring()


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     similarity: Scoring | Similarity | None = None) -> torch.Tensor:
    """Mean of text->video and video->text cross-entropy, pairs on the diagonal.

    ``video`` and ``text`` are this rank's features (the model's ``forward``: its scoring's rows and
    queries); they are gathered across ranks first. ``similarity``: the model's ``scoring`` (the logits
    are its ``logits(text, video, logit_scale)``), or a function ``(text (B, D), video (B, ...)) -> (B, B)``
    of unscaled scores (``model.similarity``; the logits are ``logit_scale`` times it); default: the dot
    products of L2-normalised features (:class:`~vop.scoring.CosineScoring`).
    """
    video, text = gather_with_grad(video), gather_with_grad(text)
    if similarity is None or isinstance(similarity, Scoring):
        logits = (similarity or _COSINE).logits(text, video, logit_scale)
    else:  # a function of unscaled scores (a model's ``similarity``)
        logits = logit_scale * similarity(text, video).float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def accumulated_backward(embed: Callable[[int], tuple[torch.Tensor, torch.Tensor]], chunks: int,
                         logit_scale: Callable[[], torch.Tensor], no_sync: Callable[[], object] | None = None,
                         similarity: Scoring | Similarity | None = None) -> float:
    """Contrastive loss over ``chunks`` micro-batches as ONE batch, with micro-batch memory (GradCache).

    Accumulating per-micro-batch losses would shrink the contrastive batch (fewer negatives) and
    change the objective; this instead (1) embeds every micro-batch without graph, (2) computes the
    loss over the whole batch and its gradient w.r.t. the embeddings, (3) re-embeds each micro-batch
    with graph and back-propagates the cached embedding gradients. The result equals the gradient of
    the full batch (the model is deterministic: frames and augmentations are fixed per sample).
    ``embed(i)`` returns the (video, text) features of micro-batch i as ``similarity`` scores them (the
    model's ``forward``: normalised vectors for a dual encoder, the raw (frames (b, F, D), text (b, D))
    for cma's query score, then cached as they are); the loss over the whole batch is
    :func:`contrastive_loss`'s.
    """
    with torch.no_grad():
        parts = [embed(i) for i in range(chunks)]
    videos = torch.cat([p[0] for p in parts]).detach().requires_grad_(True)
    texts = torch.cat([p[1] for p in parts]).detach().requires_grad_(True)
    loss = contrastive_loss(videos, texts, logit_scale(), similarity)
    loss.backward()  # gradients w.r.t. features (and the logit scale, if it is trained)
    sizes = [p[0].shape[0] for p in parts]
    gv, gt = videos.grad.split(sizes), texts.grad.split(sizes)
    for i in range(chunks):
        ctx = no_sync() if (no_sync is not None and i < chunks - 1) else _null()
        with ctx:
            v, t = embed(i)
            torch.autograd.backward([v, t], [gv[i].to(v.dtype), gt[i].to(t.dtype)])
    return loss.item()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
