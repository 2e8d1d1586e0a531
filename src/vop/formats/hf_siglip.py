"""Hugging Face ``SiglipModel`` folders and names (SigLIP, and SigLIP2 at a fixed resolution: google/siglip-*,
google/siglip2-*-patch16-224 ...).

The folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) is read as hf_clip reads a
``CLIPModel`` folder (its folder reader, and a config.json beside a file of Hugging Face names); this module
recognises SigLIP's names (the attention-pool head ``vision_model.head.*``, ``text_model.head``, ``logit_bias``)
and converts them to the canonical (OpenAI-style) names vop's towers use, no value changed but by
concatenation, transposition and reshaping:

- ``vision_model.embeddings.patch_embedding`` -> ``visual.conv1`` (with its bias); ``position_embedding.weight``
  (g^2, d) -> ``visual.positional_embedding`` (no [CLS] row); ``post_layernorm`` -> ``visual.ln_post``;
- encoder layers of both towers -> ``*.transformer.resblocks.N``: ``layer_norm1/2`` -> ``ln_1/2``, ``self_attn.{q,k,v}_proj``
  -> ``attn.in_proj_*`` (rows q, k, v), ``self_attn.out_proj`` -> ``attn.out_proj``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``;
- the MAP head ``vision_model.head``: ``probe`` -> ``visual.attn_pool.probe``; ``attention.in_proj_*`` (rows q, k, v)
  and ``attention.out_proj`` -> ``visual.attn_pool.attn.*``; ``layernorm`` -> ``visual.attn_pool.layernorm``; ``mlp.fc1/fc2``
  -> ``visual.attn_pool.mlp.c_fc/c_proj``;
- ``text_model.embeddings.{token,position}_embedding`` -> ``token_embedding`` / ``positional_embedding``;
  ``final_layer_norm`` -> ``ln_final``; ``text_model.head`` (Linear, e x d, with bias) -> ``text_projection`` (d, e) and
  ``text_projection_bias``;
- ``logit_scale`` and ``logit_bias``, (1,) in Hugging Face files, -> 0-d (open_clip's shape).

``config.json`` becomes the architecture record (every value checked: types, ranges, vop.limits): family
"siglip", each tower's activation (Hugging Face's ``gelu_pytorch_tanh`` is the tanh GELU; some open_clip SigLIP image
towers use the exact one: the record says which, and a converted file says what its config says), LayerNorm
epsilons, no [CLS], no ln_pre, the attention pool with the tower's heads and MLP, no image projection, the text
tower bidirectional and read at its last position, SigLIP's preprocessing (mean = std = 0.5, bicubic squash).
NaFlex (``Siglip2Model``, ``model_type`` "siglip2": a linear patch embedding over variable grids) is refused by
name, as is a model without the attention-pool head (``vision_use_head`` false).
"""
from __future__ import annotations

from typing import Any

import torch

from vop import limits
from vop.errors import CheckpointError
from vop.formats.registry import ArchRecord, Format, Tensors, register

_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}
_SIMPLE = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "vision_model.head.attention.in_proj_weight": "visual.attn_pool.attn.in_proj_weight",
    "vision_model.head.attention.in_proj_bias": "visual.attn_pool.attn.in_proj_bias",
    "vision_model.head.attention.out_proj.weight": "visual.attn_pool.attn.out_proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.attn_pool.attn.out_proj.bias",
    "vision_model.head.layernorm.weight": "visual.attn_pool.layernorm.weight",
    "vision_model.head.layernorm.bias": "visual.attn_pool.layernorm.bias",
    "vision_model.head.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "vision_model.head.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "vision_model.head.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "vision_model.head.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
    "vision_model.head.probe": "visual.attn_pool.probe",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_model.head.bias": "text_projection_bias",
}
_TOWERS = (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
           ("text_model.encoder.layers.", "transformer.resblocks."))
#: Hugging Face activation names -> vop's (``gelu_new`` and ``gelu_pytorch_tanh`` are both the tanh approximation)
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def has_names(sd: Tensors) -> bool:
    return "vision_model.head.probe" in sd or "text_model.head.weight" in sd or (
        "logit_bias" in sd and any(k.startswith("vision_model.") for k in sd))


def convert(sd: Tensors) -> Tensors:
    out: Tensors = {}
    qkv: dict[tuple[str, str], Tensors] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):  # a buffer of older files
            continue
        if k in _SIMPLE:
            out[_SIMPLE[k]] = v
        elif k == "text_model.head.weight":
            out["text_projection"] = v.t().contiguous()
        elif k in ("logit_scale", "logit_bias"):
            if v.numel() != 1:
                raise CheckpointError(f"{k} has shape {tuple(v.shape)}, expected one value")
            out[k] = v.reshape(())
        else:
            for hf, ours in _TOWERS:
                if k.startswith(hf):
                    idx, rest = k[len(hf):].split(".", 1)
                    base = f"{ours}{idx}."
                    parts = rest.split(".")
                    if parts[0] == "self_attn" and len(parts) == 3 and parts[1] in ("q_proj", "k_proj", "v_proj"):
                        qkv.setdefault((base, parts[2]), {})[parts[1]] = v
                    else:
                        for a, b in _BLOCK.items():
                            if rest.startswith(a + "."):
                                out[base + b + rest[len(a):]] = v
                                break
                        else:
                            raise CheckpointError(f"unexpected Hugging Face SigLIP key {k!r}")
                    break
            else:
                raise CheckpointError(f"unexpected Hugging Face SigLIP key {k!r} (vop reads SiglipModel: a MAP-head "
                                      "image tower and a text tower with a projection head)")
    for (base, kind), parts in qkv.items():
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
        if missing:
            raise CheckpointError(f"{base}: the attention lacks {', '.join(missing)} {kind}")
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def _tokenizer_kind(t: dict, vocab: int) -> str:
    """Which SentencePiece vocabulary the text tower reads (it sets the pad id of a ``.model`` file; a
    tokenizer.json names its own): Gemma's (SigLIP2: 256,000 ids, pad 0) when the vocabulary has Gemma's size or the
    config pads with 0, else T5's (SigLIP: pad = EOS = 1)."""
    return "gemma" if vocab >= 256_000 or t.get("pad_token_id") == 0 else "t5"


def arch_record(c: Any) -> ArchRecord:
    """A SiglipModel ``config.json`` as an architecture record; every value it gives checked (types, ranges:
    vop.limits), a CheckpointError naming the key otherwise."""
    if not isinstance(c, dict):
        raise CheckpointError(f"config.json must be a JSON object, got {type(c).__name__}")
    kind = c.get("model_type", "siglip")
    if kind == "siglip2":
        raise CheckpointError("config.json describes a SigLIP2 NaFlex model (Siglip2Model: a linear patch embedding over "
                              "variable-resolution grids), which vop does not build; the fixed-resolution SigLIP2 "
                              "checkpoints (SiglipModel, model_type 'siglip', e.g. google/siglip2-base-patch16-224) load")
    if kind != "siglip":
        raise CheckpointError(f"config.json has model_type {kind!r} with SigLIP's tensors; expected 'siglip' (SiglipModel)")
    v, t = c.get("vision_config", {}), c.get("text_config", {})
    for name, section in (("vision_config", v), ("text_config", t)):
        if not isinstance(section, dict):
            raise CheckpointError(f"config.json: {name} must be an object, got {type(section).__name__}")
    if v.get("vision_use_head", True) is not True:
        raise CheckpointError("config.json: vision_config.vision_use_head is false: an image tower without its attention-"
                              "pool head has no image embedding")

    def num(section: dict, where: str, key: str, default: int) -> int:
        return limits.check_int(section.get(key, default), f"config.json: {where}{key}", 1, error=CheckpointError)

    def act(section: dict, where: str) -> str:
        name = section.get("hidden_act", "gelu_pytorch_tanh")
        if name not in _ACTS:
            raise CheckpointError(f"config.json: {where}hidden_act {name!r} is not one vop builds ({', '.join(_ACTS)})")
        return _ACTS[name]

    def eps(section: dict, where: str) -> float:
        return limits.check_float(section.get("layer_norm_eps", 1e-6), f"config.json: {where}layer_norm_eps", 0, 0.1,
                                  lo_open=True, error=CheckpointError)

    if v.get("num_channels", 3) != 3:
        raise CheckpointError(f"config.json: vision_config.num_channels {v.get('num_channels')!r}: vop reads RGB frames (3)")
    vw, tw = num(v, "vision_config.", "hidden_size", 768), num(t, "text_config.", "hidden_size", 768)
    proj = num(t, "text_config.", "projection_size", tw) if t.get("projection_size") is not None else tw
    if proj != vw:
        raise CheckpointError(f"config.json: text_config.projection_size {proj} differs from vision_config.hidden_size "
                              f"{vw}: SigLIP's text tower projects into the image tower's width")
    vocab = num(t, "text_config.", "vocab_size", 32000)
    return ArchRecord({
        "family": "siglip", "act": "gelu", "embed_dim": vw, "logit_bias": True,
        "vision": {"image_size": num(v, "vision_config.", "image_size", 224),
                   "patch_size": num(v, "vision_config.", "patch_size", 16), "width": vw,
                   "layers": num(v, "vision_config.", "num_hidden_layers", 12),
                   "heads": num(v, "vision_config.", "num_attention_heads", 12),
                   "mlp_ratio": num(v, "vision_config.", "intermediate_size", 3072) / vw,
                   "act": act(v, "vision_config."), "eps": eps(v, "vision_config."), "class_token": False,
                   "ln_pre": False, "patch_bias": True, "pool": "map", "pool_mlp_ratio": None, "proj": False,
                   "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash", "interpolation": "bicubic"},
        "text": {"context_length": num(t, "text_config.", "max_position_embeddings", 64), "vocab_size": vocab,
                 "width": tw, "layers": num(t, "text_config.", "num_hidden_layers", 12),
                 "heads": num(t, "text_config.", "num_attention_heads", 12),
                 "mlp_ratio": num(t, "text_config.", "intermediate_size", 3072) / tw,
                 "act": act(t, "text_config."), "eps": eps(t, "text_config."), "causal": False, "pool": "last",
                 "proj_bias": True, "tokenizer": _tokenizer_kind(t, vocab)},
    }, "config.json describes a SigLIP architecture vop cannot build")


def to_canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Tensors, ArchRecord | None]:
    sd = convert(sd)
    return sd, (arch_record(meta["hf_config"]) if "hf_config" in meta else None)


register(Format("hf-siglip", "a Hugging Face SiglipModel folder (config.json + model.safetensors)",
                has_names=has_names, to_canonical=to_canonical))
