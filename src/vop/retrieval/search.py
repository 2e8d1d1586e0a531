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

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
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

__all__ = ["Searcher", "BackbonePool", "encode_queries", "shares_backbone", "hits", "checkpoint_scoring", "QueryCache",
           "quantize_text_tower"]


class QueryCache:
    """A least-recently-used cache of encoded queries, keyed by the model's fingerprint (checkpoint and backbone
    weights, text-tower precision, token budget: :attr:`Searcher.fingerprint`) and the exact query string: a
    repeated query skips the text tower (which dominates a query: docs/search.md, "Query latency") and gets the
    very tensor the first one got. Thread-safe; ``size`` entries at most (0: nothing kept)."""

    def __init__(self, size: int = 1024):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"the query cache size must be an integer >= 0, got {size!r}")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, fingerprint: str, text: str) -> torch.Tensor | None:
        with self._lock:
            e = self._d.get((fingerprint, text))
            if e is None:
                self.misses += 1
                return None
            self._d.move_to_end((fingerprint, text))
            self.hits += 1
            return e

    def put(self, fingerprint: str, text: str, emb: torch.Tensor) -> None:
        if not self.size:
            return
        with self._lock:
            self._d[(fingerprint, text)] = emb
            self._d.move_to_end((fingerprint, text))
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"size": self.size, "entries": len(self._d), "hits": self.hits, "misses": self.misses}


def quantize_text_tower(model) -> int:
    """int8 dynamic quantisation (``torch.ao.quantization.quantize_dynamic``) of the ``nn.Linear`` layers of the
    model's CLIP text tower (attention output, MLP: 3/4 of its weights; the fused q/k/v input projection is a plain
    tensor and stays float32), in place, for CPU serving: weights stored as int8, activations quantised per call.
    The tower is shared by the prompt sets on the same backbone (all of a ``vop serve`` are quantised or none).
    Returns the number of layers quantised (0 when already done). The ranking it changes is measured in
    docs/search.md ("Query latency"); fp32 stays the default."""
    import warnings

    with warnings.catch_warnings():  # torch 2.13 marks torch.ao.quantization deprecated (for torchao): docs/search.md
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated", category=DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

    tower = model.clip.transformer
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("--text-int8: int8 dynamic quantisation runs on the CPU; leave it out with --device cuda")
    n = sum(1 for m in tower.modules() if type(m) is torch.nn.Linear)
    if n:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated", category=DeprecationWarning)
            quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    model._vop_text_int8 = True
    return n


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
    cache: QueryCache | None = field(default=None, repr=False)  # encoded queries (SearchService shares one)

    def __post_init__(self):
        self._tok = self.model.tokenizer(max_words=self.max_words)

    @property
    def text_precision(self) -> str:
        """``int8`` when the text tower is quantised (:func:`quantize_text_tower`), else ``fp32``."""
        return "int8" if getattr(self.model, "_vop_text_int8", False) else "fp32"

    @property
    def fingerprint(self) -> str:
        """What an encoded query depends on: the index's checkpoint (SHA-256) and backbone weights (fingerprint), the
        method, the text tower's precision and the token budget; the key of :class:`QueryCache` entries."""
        info = self.index.model_info
        rec = [info.get("checkpoint_sha256"), info.get("backbone_fingerprint"), info.get("method"), self.text_precision,
               self.max_words]
        return hashlib.sha256(json.dumps(rec, default=str).encode()).hexdigest()[:24]

    @classmethod
    def open(cls, path: str | os.PathLike, *, backbone: str | None = None, checkpoint: str | os.PathLike | None = None,
             device: torch.device | str = "cpu", pool: BackbonePool | None = None, verify: bool = True,
             text_int8: bool = False, cache: QueryCache | None = None) -> "Searcher":
        """The index at ``path`` (:meth:`VideoIndex.open`; ``verify=False`` skips the checksums of its files
        and the hashing of the backbone file) and its model: the checkpoint and backbone it records (or
        ``checkpoint`` / ``backbone``: their new locations), refused if they are not the very files the
        index was built with, or if the model's kind of scores (``model.scoring.kind``) differs. ``text_int8``:
        quantise the text tower (:func:`quantize_text_tower`); ``cache``: a :class:`QueryCache` for encoded queries."""
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
        if text_int8:
            quantize_text_tower(model)
        return cls(index, model, settings.get("max_words", 32), shared, str(ckpt), cache)

    def rank(self, q: torch.Tensor, k: int, *, exact: bool | None = None, nprobe: int | None = None,
             ef_search: int | None = None, rerank: int | None = None,
             candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for encoded queries (:meth:`encode`): the index's search, with the model's
        scoring. ``k``: an integer >= 1; more than the index holds gives every video."""
        return self.index.search(q, k, exact=exact, nprobe=nprobe, ef_search=ef_search, rerank=rerank, model=self.model,
                                 candidates=candidates)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """The queries (Q, D) of ``texts``: from the :class:`QueryCache` where it has them (the exact string, this
        model's :attr:`fingerprint`), the others encoded in one batch (and kept)."""
        if self.cache is None or not len(texts):
            return self._encode(texts)
        fp = self.fingerprint
        got = [self.cache.get(fp, t) for t in texts]
        todo = list(dict.fromkeys(t for t, g in zip(texts, got) if g is None))
        if todo:
            fresh = dict(zip(todo, self._encode(todo)))
            for t in todo:
                self.cache.put(fp, t, fresh[t])
            got = [g if g is not None else fresh[t] for t, g in zip(texts, got)]
        return torch.stack(got)

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        q = encode_queries(self.model, texts, tokenizer=self._tok)
        finite = torch.isfinite(q.reshape(len(q), -1)).all(1)
        if not bool(finite.all()):
            text = texts[int((~finite).nonzero()[0, 0])]
            raise CheckpointError(f"{self.checkpoint or self.index.model_info.get('checkpoint')}: the model gave a "
                                  f"non-finite (NaN/inf) embedding for the query {text[:80]!r}: its weights are damaged")
        return q

    def search(self, texts: Sequence[str], k: int = 5, *, exact: bool | None = None, nprobe: int | None = None,
               ef_search: int | None = None, rerank: int | None = None,
               candidates: int | None = None) -> list[list[dict[str, Any]]]:
        """For each text, the top-``k`` videos: dicts with rank, row, id, score (cosine), path, duration.
        ``k``: an integer >= 1; more than the index holds gives every video (the same for every kind of
        index: exact, FAISS, and the query score's)."""
        k = check_k(k)
        if not len(texts):
            return []
        q = self.encode(texts)
        scores, rows = self.rank(q, k, exact=exact, nprobe=nprobe, ef_search=ef_search, rerank=rerank, candidates=candidates)
        return [hits(self.index, s, r) for s, r in zip(scores, rows)]


def _method_of(checkpoint: Path) -> str:
    from vop.methods.checkpoint import read_checkpoint_meta

    try:
        return str(read_checkpoint_meta(checkpoint)["method"]) if not checkpoint.is_dir() else "ModelScope folder"
    except Exception:  # noqa: BLE001
        return "?"
