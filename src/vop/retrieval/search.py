"""Text queries against an index, with the model the index was built with.

:class:`Searcher` pairs a :class:`~vop.retrieval.index.VideoIndex` with its model (rebuilt from the
checkpoint recorded in ``index.json``). :class:`BackbonePool` loads each CLIP backbone once and builds a
lightweight model per index on top of it, so several prompt sets share one copy of CLIP's weights
(a model owns only the CLIP tensors it trains -- ``bias``, ``proj``, ``partial`` -- and shares the rest;
a ``full`` checkpoint is the whole model and loads on its own).

Queries are encoded and scored by the model's scoring (:mod:`vop.scoring`), exactly as the evaluation
does: a dual encoder's normalised text embeddings against one vector per video; cma's query score's raw
text embeddings against every video's frames (:func:`vop.retrieval.topk.top_k`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vop.errors import CheckpointError, ConfigError
from vop.retrieval.format import check_model_record, rebuild_command
from vop.retrieval.index import VideoIndex, kind_mismatch
from vop.retrieval.provenance import checkpoint_sha256, load_index_model, verify_model_files
from vop.retrieval.topk import check_k
from vop.runtime import encode_texts, resolve_device
from vop.scoring import CosineScoring, Scoring

__all__ = ["Searcher", "BackbonePool", "encode_queries", "shares_backbone", "hits", "checkpoint_scoring"]


def encode_queries(model, texts: Sequence[str], max_words: int | None = 32, tokenizer=None) -> torch.Tensor:
    """The queries (Q, D), float32 CPU, of ``texts``, on the model's device: :func:`vop.runtime.encode_texts`
    (the evaluation's tokenizer budget, and the model's ``scoring.queries``: L2-normalised for a dual
    encoder, raw for cma's query score) on all ``texts`` in one batch, in fp32."""
    device = next(model.parameters()).device
    return encode_texts(model, texts, batch_size=max(1, len(texts)), device=device, max_words=max_words,
                        precision="fp32", tokenizer=tokenizer)


def shares_backbone(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's model can sit on a shared backbone: every method's can (it owns copies of the
    CLIP tensors it trains, never changing the shared CLIP), except one whose checkpoint holds every weight
    (its facts' ``whole_model``: ``full``)."""
    from vop.methods import method_facts

    return not method_facts(meta["method"]).whole_model


def checkpoint_scoring(checkpoint: str | os.PathLike) -> Scoring | None:
    """The scoring (:mod:`vop.scoring`) of the model of a checkpoint, from its metadata alone (the model is
    built on the meta device: no weights are read). The authors' ModelScope folders are dual encoders.
    None if it cannot be told (the loading says why later)."""
    from vop.backbone.clip import CLIP
    from vop.backbone.config import CLIPConfig
    from vop.methods import create_model
    from vop.methods.checkpoint import read_checkpoint_meta

    path = Path(checkpoint)
    if path.is_dir():
        return CosineScoring()
    try:
        meta = read_checkpoint_meta(path)
        with torch.device("meta"):
            m = create_model(meta["method"], CLIP(CLIPConfig.from_dict(meta["arch"])), frames=meta["frames"], **meta["options"])
        return m.scoring
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: its loading gives the clear error
        return None


class BackbonePool:
    """One CLIP per backbone name (weights file, shipped name or architecture), loaded on first use."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = resolve_device(device)
        self.clips: dict[tuple[str, Any], Any] = {}
        self.digests: dict[tuple[str, int, int], str] = {}  # SHA-256 of the files checked: each read once

    def clip(self, backbone: str, arch: Any = None, tokenizer: str | None = None):
        """``arch``: the architecture of a weights file (a name or CLIPConfig, see ``load_clip``); ``tokenizer``: the
        tokenizer file of a backbone whose vocabulary vop does not ship (SigLIP; default: one beside the weights)."""
        from vop.methods import resolve_backbone

        key = (backbone, arch, tokenizer)  # CLIPConfig is frozen: hashable
        if key not in self.clips:
            self.clips[key] = resolve_backbone(backbone, arch=arch, tokenizer=tokenizer).to(self.device).eval()
        return self.clips[key]

    def model_for(self, info: dict[str, Any], *, backbone: str | None = None, checkpoint: str | os.PathLike | None = None,
                  verify: bool = True, where: str = "the index", rebuild: str = "vop index ... --rebuild"):
        """The model of an index's ``model`` record. Returns ``(model, shared)``. The checkpoint and the
        backbone weights file are checked against the index's record first (:func:`verify_model_files`)."""
        from vop.backbone.config import CLIPConfig
        from vop.methods import create_model
        from vop.methods.checkpoint import check_backbone, load_trainable

        meta = info["checkpoint_meta"]
        ckpt = Path(checkpoint or info["checkpoint"])
        bb = backbone or info.get("backbone")
        if not shares_backbone(meta) or bb is None:
            return load_index_model(info, backbone=bb, checkpoint=ckpt, device=self.device, verify=verify,
                                    memo=self.digests, where=where, rebuild=rebuild), False
        if not ckpt.exists():
            raise CheckpointError(f"{ckpt}: the index's prompt checkpoint is missing; pass its new location")
        if not verify_model_files(info, checkpoint=ckpt, backbone=bb, verify=verify, memo=self.digests, where=where,
                                  rebuild=rebuild):
            if checkpoint_sha256(ckpt) != info["checkpoint_sha256"]:
                raise CheckpointError(f"{ckpt}: differs from the checkpoint this index was built with; re-run `vop index`")
        try:
            arch = CLIPConfig.from_dict(meta["arch"])
        except Exception as e:  # noqa: BLE001 - index.json's copy of the checkpoint's architecture is damaged
            raise CheckpointError(f"{where}: model.checkpoint_meta.arch is damaged ({type(e).__name__}: {e}); "
                                  f"rebuild the index: {rebuild}") from None
        tok = meta.get("tokenizer")  # SigLIP: the tokenizer file the checkpoint was trained with, if it is still there
        clip = self.clip(str(bb), arch=arch, tokenizer=tok if isinstance(tok, str) and Path(tok).exists() else None)
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
    checkpoint: str | None = None  # the file the model was loaded from (for messages)

    def __post_init__(self):
        self._tok = self.model.tokenizer(max_words=self.max_words)

    @classmethod
    def open(cls, path: str | os.PathLike, *, backbone: str | None = None, checkpoint: str | os.PathLike | None = None,
             device: torch.device | str = "cpu", pool: BackbonePool | None = None, verify: bool = True) -> "Searcher":
        """The index at ``path`` (:meth:`VideoIndex.open`; ``verify=False`` skips the checksums of its files
        and the hashing of the backbone file) and its model: the checkpoint and backbone it records (or
        ``checkpoint`` / ``backbone``: their new locations), refused if they are not the very files the
        index was built with, or if the model's kind of scores (``model.scoring.kind``) differs."""
        index = VideoIndex.open(path, verify=verify)
        where, rebuild = f"the index {index.path}", rebuild_command(index.path, index.meta)
        info = check_model_record(index.model_info, str(index.path / "index.json"), rebuild)
        ckpt = Path(checkpoint or info["checkpoint"])
        if checkpoint is not None:  # another file: a model of another kind is named as such, before any hashing
            scoring = checkpoint_scoring(ckpt)
            if scoring is not None and scoring.kind != index.scoring.kind:
                raise ConfigError(kind_mismatch(index.path, index.scoring, ckpt, scoring, _method_of(ckpt), index.meta))
        if pool is not None:
            model, shared = pool.model_for(info, backbone=backbone, checkpoint=checkpoint, verify=verify, where=where,
                                           rebuild=rebuild)
        else:
            model, shared = load_index_model(info, backbone=backbone, checkpoint=checkpoint, device=device, verify=verify,
                                             where=where, rebuild=rebuild), False
        index.check_model(model, ckpt)  # a model of another kind of scores than the index's does not mix
        settings = index.meta["settings"]  # (its frame count only mattered for encoding the videos)
        return cls(index, model, settings.get("max_words", 32), shared, str(ckpt))

    def rank(self, q: torch.Tensor, k: int, *, exact: bool | None = None, nprobe: int | None = None,
             ef_search: int | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for encoded queries (:meth:`encode`): the index's search, with the model's
        scoring. ``k``: an integer >= 1; more than the index holds gives every video."""
        return self.index.search(q, k, exact=exact, nprobe=nprobe, ef_search=ef_search, rerank=rerank, model=self.model)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        q = encode_queries(self.model, texts, tokenizer=self._tok)
        finite = torch.isfinite(q.reshape(len(q), -1)).all(1)
        if not bool(finite.all()):
            text = texts[int((~finite).nonzero()[0, 0])]
            raise CheckpointError(f"{self.checkpoint or self.index.model_info.get('checkpoint')}: the model gave a "
                                  f"non-finite (NaN/inf) embedding for the query {text[:80]!r}: its weights are damaged")
        return q

    def search(self, texts: Sequence[str], k: int = 5, *, exact: bool | None = None, nprobe: int | None = None,
               ef_search: int | None = None, rerank: int | None = None) -> list[list[dict[str, Any]]]:
        """For each text, the top-``k`` videos: dicts with rank, row, id, score (cosine), path, duration.
        ``k``: an integer >= 1; more than the index holds gives every video (the same for every kind of
        index: exact, FAISS, and the query score's)."""
        k = check_k(k)
        if not len(texts):
            return []
        q = self.encode(texts)
        scores, rows = self.rank(q, k, exact=exact, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
        return [hits(self.index, s, r) for s, r in zip(scores, rows)]


def _method_of(checkpoint: Path) -> str:
    from vop.methods.checkpoint import read_checkpoint_meta

    try:
        return str(read_checkpoint_meta(checkpoint)["method"]) if not checkpoint.is_dir() else "ModelScope folder"
    except Exception:  # noqa: BLE001
        return "?"
