"""open_clip's ``CustomTextCLIP`` with a timm image tower: names ``visual.trunk.*`` (timm's ``Eva``, or its
``VisionTransformer`` for SigLIP) and ``text.*`` (open_clip's text tower), as open_clip saves PE-Core,
EVA02-CLIP and SigLIP / SigLIP2 (``.pt``, ``.bin`` or ``.safetensors``; the file formats read the bytes).

Converted to the canonical (OpenAI-style) names vop's towers use, tensor by tensor, no value changed but
by concatenation and transposition:

- ``cls_token`` (1, 1, d) -> ``visual.class_embedding`` (d); ``pos_embed`` (1, N, d) -> ``visual.positional_embedding``;
  ``patch_embed.proj`` -> ``visual.conv1``; ``norm_pre`` -> ``visual.ln_pre``; ``norm`` -> ``visual.ln_post``;
- blocks -> ``visual.transformer.resblocks.N``: ``norm1``/``norm2`` -> ``ln_1``/``ln_2``; ``attn.qkv`` ->
  ``attn.in_proj_*``; EVA02's ``attn.{q,k,v}_proj.weight`` -> ``attn.in_proj_weight`` (rows q, k, v),
  ``attn.q_proj.bias`` / ``attn.v_proj.bias`` (or timm's fused ``attn.q_bias`` / ``attn.v_bias``) ->
  ``attn.q_bias`` / ``attn.v_bias`` (the key has no bias); ``attn.norm`` (sub-LN) kept; ``attn.proj`` ->
  ``attn.out_proj``; ``mlp.fc1``/``fc2`` -> ``mlp.c_fc``/``c_proj``; SwiGLU's ``mlp.fc1_g`` and ``mlp.fc1_x`` ->
  ``mlp.c_fc`` (gate rows, then value rows), ``mlp.norm`` kept;
- ``attn_pool`` (timm's AttentionPoolLatent) -> PE's names: ``latent`` -> ``probe``; ``q`` and ``kv`` ->
  ``attn.in_proj_*`` (rows q, k, v); ``proj`` -> ``attn.out_proj``; ``norm`` -> ``layernorm``; ``mlp.fc1``/``fc2``
  -> ``mlp.c_fc``/``c_proj``;
- ``head`` (timm's classifier = open_clip's projection, ``timm_proj: null``) (e, d) -> ``visual.proj`` (d, e)
  and ``head.bias`` -> ``visual.proj_bias``;
- ``text.*`` -> the text tower's OpenAI names (the prefix removed); SigLIP's text projection, an ``nn.Linear``
  (``text.text_projection.weight`` (e, d) and ``.bias``) -> ``text_projection`` (d, e) and ``text_projection_bias``;
- ``logit_scale`` and SigLIP's ``logit_bias`` as they are (0-d).

SigLIP's image tower has no ``cls_token`` (its ``pos_embed`` covers the patches only) and no ``head`` (open_clip's
``timm_proj: "none"``): the read-out is the attention pool's output.

A tensor of the trunk this table does not name (layer scale, register tokens, an extra ``visual.head.*``
projection ...) is refused by name: the architectures it belongs to are not ones vop builds.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from vop.errors import CheckpointError
from vop.formats.registry import ArchRecord, Format, Tensors, register

_TRUNK = "visual.trunk."
_SIMPLE = {
    "patch_embed.proj.weight": "visual.conv1.weight", "patch_embed.proj.bias": "visual.conv1.bias",
    "norm_pre.weight": "visual.ln_pre.weight", "norm_pre.bias": "visual.ln_pre.bias",
    "norm.weight": "visual.ln_post.weight", "norm.bias": "visual.ln_post.bias",
    "head.bias": "visual.proj_bias",
    "attn_pool.proj.weight": "visual.attn_pool.attn.out_proj.weight",
    "attn_pool.proj.bias": "visual.attn_pool.attn.out_proj.bias",
    "attn_pool.norm.weight": "visual.attn_pool.layernorm.weight", "attn_pool.norm.bias": "visual.attn_pool.layernorm.bias",
    "attn_pool.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight", "attn_pool.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "attn_pool.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "attn_pool.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
    "attn_pool.latent": "visual.attn_pool.probe",
}
_BLOCK = {
    "norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.in_proj", "attn.norm": "attn.norm", "attn.proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "mlp.norm": "mlp.norm",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_FUSED_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.([qv])_bias$")


def has_names(sd: Tensors) -> bool:
    return any(k.startswith(_TRUNK) for k in sd)


def _unknown(key: str) -> CheckpointError:
    return CheckpointError(f"the timm image tower has a tensor vop's towers do not ({key}); vop builds open_clip's "
                           "PE-Core, EVA02-CLIP and SigLIP towers (docs/methods.md, Backbones)")


def to_canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Tensors, ArchRecord | None]:
    out: Tensors = {}
    parts: dict[tuple[str, str], Tensors] = {}  # tensors to concatenate: (target, kind) -> {piece: tensor}
    for key, v in sd.items():
        if key == "text.text_projection.weight":  # SigLIP: an nn.Linear (out x in) with a bias
            out["text_projection"] = v.t().contiguous()
            continue
        if key == "text.text_projection.bias":
            out["text_projection_bias"] = v
            continue
        if key.startswith("text."):
            out[key[len("text."):]] = v
            continue
        if key.startswith("visual.head."):
            raise CheckpointError(f"an extra projection after the timm image tower ({key}; open_clip's timm_proj "
                                  "'linear' or 'mlp'), which vop's towers do not have")
        if not key.startswith(_TRUNK):
            out[key] = v  # logit_scale, logit_bias
            continue
        k = key[len(_TRUNK):]
        if k in _SIMPLE:
            out[_SIMPLE[k]] = v
        elif k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v.reshape(v.shape[-2], v.shape[-1])
        elif k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k in ("attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.weight", "attn_pool.kv.bias"):
            piece, kind = k.split(".")[1:]
            parts.setdefault((f"visual.attn_pool.attn.in_proj_{kind}", kind), {})[piece] = v
        elif _FUSED_BIAS.match(k):  # timm's fused EVA attention: q and v biases as parameters of their own
            i, which = _FUSED_BIAS.match(k).groups()
            out[f"visual.transformer.resblocks.{i}.attn.{which}_bias"] = v
        else:
            m = _BLOCK_KEY.match(k)
            if m is None:
                raise _unknown(key)
            i, rest, kind = m.groups()
            base = f"visual.transformer.resblocks.{i}."
            if rest in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
                if kind == "bias":
                    if rest == "attn.k_proj":
                        raise _unknown(key)
                    out[f"{base}attn.{rest[5]}_bias"] = v
                else:
                    parts.setdefault((f"{base}attn.in_proj_weight", "qkv"), {})[rest[5]] = v
            elif rest in ("mlp.fc1_g", "mlp.fc1_x"):
                parts.setdefault((f"{base}mlp.c_fc.{kind}", "glu"), {})[rest[-1]] = v
            elif rest in _BLOCK:
                out[f"{base}{_BLOCK[rest]}{'_' if rest == 'attn.qkv' else '.'}{kind}"] = v
            else:
                raise _unknown(key)
    for (target, kind), got in parts.items():
        order = {"weight": ("q", "kv"), "bias": ("q", "kv"), "qkv": ("q", "k", "v"), "glu": ("g", "x")}[kind]
        missing = [p for p in order if p not in got]
        if missing:
            raise CheckpointError(f"the timm image tower lacks part of {target} ({', '.join(missing)})")
        out[target] = torch.cat([got[p] for p in order])
    return out, None


register(Format("open-clip-timm", has_names=has_names, to_canonical=to_canonical))
