"""Meta's own Perception Encoder checkpoints (``PE-Core-B16-224.pt`` ...: facebookresearch/perception_models).

OpenAI-style names (the text tower at top level, the image tower under ``visual.``: ``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.*``, ``ln_post``), plus the
attention pool ``visual.attn_pool.{probe, attn.in_proj_*, attn.out_proj, layernorm, mlp.c_fc, mlp.c_proj}`` and
the projection ``visual.proj`` (width x embed) *without* a bias: these are vop's canonical names, so the
conversion adds the projection's bias as zeros (what timm's converter writes, eva.py ``_convert_pe``; open_clip
files carry it, and a fine-tune may train it) and drops rotary-table buffers if a file holds any (``*.rope.*``:
recomputed from the architecture record). Recognised by ``visual.attn_pool.probe`` with ``visual.proj`` and no
``visual.proj_bias``.
"""
from __future__ import annotations

from typing import Any

import torch

from vop.formats.registry import ArchRecord, Format, Tensors, register


def has_names(sd: Tensors) -> bool:
    return "visual.attn_pool.probe" in sd and "visual.proj" in sd and "visual.proj_bias" not in sd


def to_canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Tensors, ArchRecord | None]:
    out = {k: v for k, v in sd.items() if not (k.startswith("visual.") and ".rope." in f".{k}")}
    proj = out["visual.proj"]
    out["visual.proj_bias"] = torch.zeros(proj.shape[-1], dtype=proj.dtype)
    return out, None


register(Format("pe-clip", has_names=has_names, to_canonical=to_canonical))
