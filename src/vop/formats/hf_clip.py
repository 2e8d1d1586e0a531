"""Hugging Face ``CLIPModel`` folders and names.

A folder: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (each read by the file
formats, by content). Hugging Face names (``vision_model.*``, ``text_model.*``), in a folder or in a
file given alone (its ``config.json`` beside it is then read too), are converted to OpenAI names: q/k/v
fused into ``in_proj``, projections transposed. ``config.json`` becomes the architecture record, every
value it gives checked (types, ranges: vop.limits) before anything is built. The folder format is the
fallback of the folders: a folder without config.json is refused here, saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vop import limits
from vop.errors import CheckpointError
from vop.formats.registry import ArchRecord, Format, Tensors, expected, read_raw, register

_PREFIXES = ("vision_model.", "text_model.")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_folder(path: Path) -> tuple[Tensors, dict[str, Any]]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: a folder without config.json is not a Hugging Face CLIPModel or SiglipModel; expected {expected()}")
    for name in WEIGHTS:
        if (path / name).exists():
            sd, _ = read_raw(path / name)
            return sd, {"hf_config": json.loads(cfg_file.read_text())}
    raise CheckpointError(f"{path}: has config.json but neither model.safetensors nor pytorch_model.bin")


def beside(path: Path, sd: Tensors) -> dict[str, Any]:
    """A file of Hugging Face names given alone: the config.json beside it."""
    hf_cfg = path.parent / "config.json"
    if any(k.startswith(_PREFIXES) for k in sd) and hf_cfg.exists():
        return {"hf_config": json.loads(hf_cfg.read_text())}
    return {}


def has_names(sd: Tensors) -> bool:
    return any(k.startswith(_PREFIXES) for k in sd)


def convert_hf(sd: Tensors) -> Tensors:
    """Hugging Face CLIPModel names -> OpenAI names (q/k/v fused into in_proj, projections transposed)."""
    out: Tensors = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    qkv: dict[tuple[str, str], Tensors] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        for hf_tower, ours in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                               ("text_model.encoder.layers.", "transformer.resblocks.")):
            if k.startswith(hf_tower):
                idx, rest = k[len(hf_tower):].split(".", 1)
                base = f"{ours}{idx}."
                if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                    _, which, kind = rest.split(".")
                    qkv.setdefault((base, kind), {})[which] = v
                else:
                    for a, b in block.items():
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                    out[base + rest] = v
                break
        else:
            simple = {
                "vision_model.embeddings.class_embedding": "visual.class_embedding",
                "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                "vision_model.post_layernorm.bias": "visual.ln_post.bias",
                "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias",
                "logit_scale": "logit_scale",
            }
            if k in simple:
                out[simple[k]] = v
            elif k == "visual_projection.weight":
                out["visual.proj"] = v.t().contiguous()
            elif k == "text_projection.weight":
                out["text_projection"] = v.t().contiguous()
            else:
                raise CheckpointError(f"unexpected Hugging Face key {k!r}")
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def arch_record(c: Any) -> ArchRecord:
    """A ``config.json`` as an architecture record (``CLIPConfig.to_dict``'s layout); every value it gives
    checked (types, ranges: vop.limits), a CheckpointError naming the key otherwise."""
    if not isinstance(c, dict):
        raise CheckpointError(f"config.json must be a JSON object, got {type(c).__name__}")
    v, t = c.get("vision_config", {}), c.get("text_config", {})
    for name, section in (("vision_config", v), ("text_config", t)):
        if not isinstance(section, dict):
            raise CheckpointError(f"config.json: {name} must be an object, got {type(section).__name__}")
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"unsupported Hugging Face activation(s) {sorted(acts, key=repr)}")

    def num(section: dict, where: str, key: str, default: int) -> int:
        value = section.get(key, default)
        return limits.check_int(value, f"config.json: {where}{key}", 1, error=CheckpointError)

    vw, tw = num(v, "vision_config.", "hidden_size", 768), num(t, "text_config.", "hidden_size", 512)
    return ArchRecord({
        "embed_dim": num(c, "", "projection_dim", 512),
        "vision": {"image_size": num(v, "vision_config.", "image_size", 224),
                   "patch_size": num(v, "vision_config.", "patch_size", 32), "width": vw,
                   "layers": num(v, "vision_config.", "num_hidden_layers", 12),
                   "heads": num(v, "vision_config.", "num_attention_heads", 12),
                   "mlp_ratio": num(v, "vision_config.", "intermediate_size", 3072) / vw},
        "text": {"context_length": num(t, "text_config.", "max_position_embeddings", 77),
                 "vocab_size": num(t, "text_config.", "vocab_size", 49408), "width": tw,
                 "layers": num(t, "text_config.", "num_hidden_layers", 12),
                 "heads": num(t, "text_config.", "num_attention_heads", 8),
                 "mlp_ratio": num(t, "text_config.", "intermediate_size", 2048) / tw},
        "act": acts.pop(),
    }, "config.json describes an architecture vop cannot build")


def to_canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Tensors, ArchRecord | None]:
    sd = convert_hf(sd)
    return sd, (arch_record(meta["hf_config"]) if "hf_config" in meta else None)


register(Format("hf-clip", "a Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)",
                is_folder=lambda path: True, read_folder=read_folder, beside=beside, has_names=has_names,
                to_canonical=to_canonical, fallback=True))
