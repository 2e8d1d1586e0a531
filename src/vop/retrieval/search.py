"""Text queries against an index, with the model the index was built with.

:class:`Searcher` pairs a :class:`~vop.retrieval.index.VideoIndex` with its model (rebuilt from the
checkpoint recorded in ``index.json``). :class:`BackbonePool` loads each CLIP backbone once and builds a
lightweight model per index on top of it, so several prompt sets share one copy of CLIP's weights
(methods that change CLIP's own tensors -- ``full``, ``bias``, ``proj``, ``partial`` -- cannot share
and get their own copy).

A pairwise model (``model.pairwise``: cma's query score) has an index of per-frame embeddings; its
queries are its raw text embeddings, scored against every video with the model's similarity
(:func:`vop.retrieval.index.pairwise_search`), exactly as the evaluation scores them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vop.errors import CheckpointError
from vop.retrieval.index import VideoIndex, checkpoint_sha256, load_index_model
from vop.runtime import encode_texts, resolve_device

__all__ = ["Searcher", "BackbonePool", "encode_queries", "shares_backbone", "hits"]


def encode_queries(model, texts: Sequence[str], max_words: int | None = 32, tokenizer=None) -> torch.Tensor:
    """L2-normalised text embeddings (Q, D), float32 CPU, on the model's device: :func:`vop.runtime.encode_texts`
    (the evaluation's tokenizer budget and normalisation) on all ``texts`` in one batch, in fp32. A pairwise
    model's are raw (as its similarity reads them), as in the evaluation."""
    device = next(model.parameters()).device
    return encode_texts(model, texts, batch_size=max(1, len(texts)), device=device, max_words=max_words,
                        precision="fp32", tokenizer=tokenizer)


def shares_backbone(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's method trains only tensors outside CLIP (prompts, adapters, zero-shot),
    so that its model can sit on a shared backbone: its facts (``trains_backbone``) say so."""
    from vop.methods import method_facts

    return not method_facts(meta["method"]).trains_backbone


class BackbonePool:
    """One CLIP per backbone name (weights file, shipped name or architecture), loaded on first use."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = resolve_device(device)
        self.clips: dict[tuple[str, Any], Any] = {}

    def clip(self, backbone: str, arch: Any = None):
        """``arch``: the architecture of a weights file (a name or CLIPConfig, see ``load_clip``)."""
        from vop.methods import resolve_backbone

        key = (backbone, arch)  # CLIPConfig is frozen: hashable
        if key not in self.clips:
            self.clips[key] = resolve_backbone(backbone, arch=arch).to(self.device).eval()
        return self.clips[key]

    def model_for(self, info: dict[str, Any], *, backbone: str | None = None, checkpoint: str | os.PathLike | None = None):
        """The model of an index's ``model`` record. Returns ``(model, shared)``."""
        from vop.backbone.config import CLIPConfig
        from vop.methods import create_model
        from vop.methods.checkpoint import check_backbone, load_trainable

        meta = info["checkpoint_meta"]
        ckpt = Path(checkpoint or info["checkpoint"])
        bb = backbone or info.get("backbone")
        if not shares_backbone(meta) or bb is None:
            return load_index_model(info, backbone=bb, checkpoint=ckpt, device=self.device), False
        if not ckpt.exists():
            raise CheckpointError(f"{ckpt}: the index's prompt checkpoint is missing; pass its new location")
        if checkpoint_sha256(ckpt) != info["checkpoint_sha256"]:
            raise CheckpointError(f"{ckpt}: differs from the checkpoint this index was built with; re-run `vop index`")
        clip = self.clip(str(bb), arch=CLIPConfig.from_dict(meta["arch"]))
        check_backbone(ckpt, meta, clip, True)
        model = create_model(meta["method"], clip, frames=meta["frames"], **meta["options"])
        load_trainable(model, ckpt, meta)
        return model.to(self.device).eval(), True


def hits(index: VideoIndex, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for rank, (s, r) in enumerate(zip(scores.tolist(), rows.tolist()), 1):
        if r < 0:
            continue
        e = index.entries[r]
        h = {"rank": rank, "row": int(r), "id": e["id"], "score": float(s), "path": e["path"], "duration": e.get("duration")}
        if e.get("captions"):
            h["captions"] = e["captions"]
        out.append(h)
    return out


@dataclass
class Searcher:
    """An index and its model. ``Searcher.open(INDEX).search(["a dog runs"], k=5)``."""

    index: VideoIndex
    model: Any
    max_words: int = 32
    shared: bool = False

    def __post_init__(self):
        self._tok = self.model.tokenizer(max_words=self.max_words)

    @classmethod
    def open(cls, path: str | os.PathLike, *, backbone: str | None = None, checkpoint: str | os.PathLike | None = None,
             device: torch.device | str = "cpu", pool: BackbonePool | None = None) -> "Searcher":
        index = VideoIndex.open(path)
        info = index.model_info
        if pool is not None:
            model, shared = pool.model_for(info, backbone=backbone, checkpoint=checkpoint)
        else:
            model, shared = load_index_model(info, backbone=backbone, checkpoint=checkpoint, device=device), False
        index.check_model(model)  # a pairwise model and an index of one vector per video (or the reverse) do not mix
        settings = index.meta["settings"]  # (its frame count only mattered for encoding the videos)
        return cls(index, model, settings.get("max_words", 32), shared)

    @property
    def pairwise(self) -> bool:
        return self.index.pairwise

    def rank(self, q: torch.Tensor, k: int, *, exact: bool | None = None, nprobe: int | None = None,
             ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for encoded queries (:meth:`encode`): the index's search, with the model
        for a pairwise index."""
        return self.index.search(q, k, exact=exact, nprobe=nprobe, ef_search=ef_search, model=self.model)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_queries(self.model, texts, tokenizer=self._tok)

    def search(self, texts: Sequence[str], k: int = 5, *, exact: bool | None = None, nprobe: int | None = None,
               ef_search: int | None = None) -> list[list[dict[str, Any]]]:
        """For each text, the top-``k`` videos: dicts with rank, row, id, score (cosine), path, duration."""
        if not len(texts):
            return []
        q = self.encode(texts)
        scores, rows = self.rank(q, k, exact=exact, nprobe=nprobe, ef_search=ef_search)
        return [hits(self.index, s, r) for s, r in zip(scores, rows)]
