"""One loader for every CLIP checkpoint format people have.

Accepted:
- TorchScript archives (OpenAI's released ``ViT-B-32.pt`` ..., traced or scripted, fp16 or fp32),
  recognised by content whatever the file is called: read by a restricted reader
  (``vop.backbone.torchscript``) that never compiles or runs the archive's code, giving the state
  dict ``torch.jit.load(path).state_dict()`` would; an archive it cannot read as plain weights is
  refused with the command that converts a trusted file to safetensors.
- Plain state dicts as saved by open_clip or ``torch.save`` (``.pt``, ``.pth``, ``.bin``), optionally
  wrapped in ``{"state_dict": ...}`` / ``{"model": ...}`` and/or with ``module.`` prefixes, read with
  ``torch.load(weights_only=True)`` (never arbitrary unpickling).
- ``.safetensors`` files with OpenAI/open_clip names, or with Hugging Face names.
- Hugging Face ``CLIPModel`` folders: ``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``; keys are converted to OpenAI names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from vop.backbone.clip import CLIP
from vop import limits
from vop.backbone.config import (ACTS, CLIPConfig, TextConfig, VisionConfig, arch_name, check_heads, check_supported,
                                get_arch, infer_config, is_arch, parameter_count, same_tensors)
from vop.backbone.torchscript import is_torchscript, read_torchscript
from vop.errors import CheckpointError, ConfigError

FORMATS = (
    "an OpenAI TorchScript .pt, an open_clip/PyTorch state dict (.pt/.pth/.bin), a .safetensors "
    "file, or a Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)"
)
_META_KEY = "vop_clip_config"


# ---------------------------------------------------------------------------------------------
# reading raw state dicts
# ---------------------------------------------------------------------------------------------
def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < (1 << 30) and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj.get(key), torch.Tensor):
                return _unwrap(obj[key], path)
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if sd:
            return sd
    raise CheckpointError(f"{path}: holds no tensors; expected {FORMATS}")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file or folder into (state dict with raw keys, metadata)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected {FORMATS}")
    try:
        if path.is_dir():
            cfg_file = path / "config.json"
            if not cfg_file.exists():
                raise CheckpointError(f"{path}: a folder without config.json is not a Hugging Face CLIPModel; expected {FORMATS}")
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).exists():
                    sd, _ = read_state_dict(path / name)
                    return sd, {"hf_config": json.loads(cfg_file.read_text())}
            raise CheckpointError(f"{path}: has config.json but neither model.safetensors nor pytorch_model.bin")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty; expected {FORMATS}")
        meta: dict[str, Any] = {}
        if _is_safetensors(path):
            sd, meta = _read_safetensors(path)
        elif is_torchscript(path):  # never torch.jit.load: the archive's code would run
            sd = read_torchscript(path)
        else:  # weights_only: torch 2.13 refuses a TorchScript archive here, it never dispatches to jit
            sd = _unwrap(torch.load(str(path), map_location="cpu", weights_only=True), path)
        hf_cfg = path.parent / "config.json"
        if any(k.startswith(("vision_model.", "text_model.")) for k in sd) and hf_cfg.exists():
            meta["hf_config"] = json.loads(hf_cfg.read_text())
        return sd, meta
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, bad pickle, safetensors header errors ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as a CLIP checkpoint ({reason}); expected {FORMATS}") from None


# ---------------------------------------------------------------------------------------------
# key conversion
# ---------------------------------------------------------------------------------------------
def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "clip."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    # open_clip CustomTextCLIP keeps the text tower under "text."
    if "text.token_embedding.weight" in sd:
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    return sd


def convert_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPModel names -> OpenAI names (q/k/v fused into in_proj, projections transposed)."""
    out: dict[str, torch.Tensor] = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
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


def _hf_config(c: Any) -> CLIPConfig:
    """A Hugging Face CLIPModel ``config.json`` as a CLIPConfig; every value it gives checked (types, ranges:
    vop.limits) before anything is built, a CheckpointError naming the key otherwise."""
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
    try:
        return CLIPConfig(
            embed_dim=num(c, "", "projection_dim", 512),
            vision=VisionConfig(image_size=num(v, "vision_config.", "image_size", 224),
                                patch_size=num(v, "vision_config.", "patch_size", 32), width=vw,
                                layers=num(v, "vision_config.", "num_hidden_layers", 12),
                                heads=num(v, "vision_config.", "num_attention_heads", 12),
                                mlp_ratio=num(v, "vision_config.", "intermediate_size", 3072) / vw),
            text=TextConfig(context_length=num(t, "text_config.", "max_position_embeddings", 77),
                            vocab_size=num(t, "text_config.", "vocab_size", 49408), width=tw,
                            layers=num(t, "text_config.", "num_hidden_layers", 12),
                            heads=num(t, "text_config.", "num_attention_heads", 8),
                            mlp_ratio=num(t, "text_config.", "intermediate_size", 2048) / tw),
            act=acts.pop(),
        )
    except ConfigError as e:
        raise CheckpointError(f"config.json describes an architecture vop cannot build: {e}") from None


def _recorded_config(meta: dict[str, Any]) -> CLIPConfig:
    """The architecture record of our own safetensors files (metadata ``vop_clip_config``), checked."""
    try:
        record = json.loads(meta[_META_KEY])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"its architecture record (metadata {_META_KEY}) is not valid JSON ({e}); "
                              "re-save the weights with vop.save_clip, or remove the record to infer the "
                              "architecture from the tensors") from None
    try:
        return CLIPConfig.from_dict(record)
    except ConfigError as e:
        raise CheckpointError(f"its architecture record (metadata {_META_KEY}) is not usable: {e}") from None


def to_openai(sd: dict[str, torch.Tensor], meta: dict[str, Any], act: str | None = None,
              heads: tuple[int, int] | None = None,
              arch: str | CLIPConfig | None = None) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Normalise keys to OpenAI names and work out the architecture: ``arch`` if given (the file's
    own record, if any, must agree), else the file's record (our metadata, a Hugging Face config),
    else inferred from the tensors. Every record and ``heads=``/``act=`` is checked before use (vop.limits);
    the tensors are compared with the architecture, shape by shape, by :func:`load_clip`."""
    if heads is not None:
        heads = check_heads(heads)
    if act is not None and act not in ACTS:
        raise CheckpointError(f"act= must be one of {', '.join(ACTS)}, got {act!r}")
    sd = _strip_prefixes(sd)
    for k in ("input_resolution", "context_length", "vocab_size"):  # scalars in OpenAI's archive
        sd.pop(k, None)
    recorded = None
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        sd = convert_hf(sd)
        if "hf_config" in meta:
            recorded = _hf_config(meta["hf_config"])
    if recorded is None and _META_KEY in meta:
        recorded = _recorded_config(meta)
    check_supported(sd)
    if arch is not None:
        if heads is not None:
            raise CheckpointError("give arch= or heads=, not both: the architecture fixes the head counts")
        if not isinstance(arch, (str, CLIPConfig)):
            raise CheckpointError(f"arch= must be an architecture name or a CLIPConfig, got {type(arch).__name__}")
        cfg = get_arch(arch) if isinstance(arch, str) else arch
        if recorded is not None and not same_tensors(recorded, cfg):
            raise CheckpointError(f"the file records a {_describe(recorded)}, not the {_describe(cfg)} named by arch=")
    elif recorded is not None:
        cfg = recorded
    else:
        return sd, infer_config(sd, act=act, heads=heads)  # type: ignore[arg-type]
    return sd, cfg if act is None else dataclasses.replace(cfg, act=act)  # type: ignore[arg-type]


def _describe(cfg: CLIPConfig) -> str:
    v, t = cfg.vision, cfg.text
    name = arch_name(cfg)
    return (f"{name + ' ' if name else ''}({v.width}-wide {v.layers}-layer image tower with {v.heads} heads, "
            f"patch {v.patch_size}, {v.image_size} px; {t.width}-wide {t.layers}-layer text tower with {t.heads} heads)")


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _check_clip_fits(cfg: CLIPConfig, what: str) -> None:
    """Refuse (ConfigError) to build a CLIP whose float32 weights exceed the free memory of the CPU."""
    from vop.memory import check_fits

    n = parameter_count(cfg)
    check_fits(4 * n, "cpu", f"the CLIP backbone {what} ({n:,} float32 parameters)",
               "use a smaller architecture (vop.list_archs())")


def build_clip(arch: str | CLIPConfig, seed: int | None = None) -> CLIP:
    """A randomly initialised CLIP of a registered architecture (for tests, counts and pretraining)."""
    cfg = get_arch(arch) if isinstance(arch, str) else arch
    if not isinstance(cfg, CLIPConfig):
        raise ConfigError(f"build_clip: an architecture name or a CLIPConfig, got {type(cfg).__name__}")
    _check_clip_fits(cfg, arch_name(cfg) or "this architecture")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return CLIP(cfg)
    return CLIP(cfg)


def _shipped(name: str) -> Path | None:
    from importlib import resources

    f = resources.files("vop").joinpath("assets", f"{name}.safetensors")
    return Path(str(f)) if f.is_file() else None


def load_clip(path_or_name: str | os.PathLike, *, arch: str | CLIPConfig | None = None, act: str | None = None,
              heads: tuple[int, int] | None = None) -> CLIP:
    """Load CLIP weights from any supported format (see the module docstring), or a shipped name.

    ``arch`` names the architecture (``"ViT-H-14"``, see ``list_archs()``, or a CLIPConfig); the
    tensors must then fit it exactly. Without it, the file's own record is used (our safetensors
    metadata, a Hugging Face config.json), else the architecture is inferred from the tensors (see
    ``infer_config``): a CheckpointError says when the head counts cannot be known. ``act`` overrides
    the activation (released OpenAI weights use QuickGELU; most LAION open_clip weights use GELU and
    cannot be told apart from the tensors). ``heads=(vision_heads, text_heads)`` sets the head counts
    of a file without an architecture record.
    """
    p = Path(path_or_name)
    if not p.exists() and isinstance(path_or_name, str):
        shipped = _shipped(path_or_name)
        if shipped is not None:
            p = shipped
        elif is_arch(path_or_name):
            raise CheckpointError(
                f"{path_or_name!r} is an architecture, not weights: give a weights file "
                f"(nothing is downloaded), or use vop.build_clip({path_or_name!r}) for random weights"
            )
    raw, meta = read_state_dict(p)
    try:
        sd, cfg = to_openai(raw, meta, act=act, heads=heads, arch=arch)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    sd = {k: v for k, v in sd.items() if k != "attn_mask"}
    with torch.device("meta"):
        expected = CLIP(cfg).state_dict()
    missing = [k for k in expected if k not in sd]
    bad = next((k for k in expected if k not in sd or sd[k].shape != expected[k].shape), None)
    if bad is not None:
        got = "missing" if bad not in sd else f"of shape {tuple(sd[bad].shape)}"
        raise CheckpointError(
            f"{p}: does not fit the architecture {_describe(cfg)}{' named by arch=' if arch is not None else ''}: "
            f"{bad} is {got}, expected {tuple(expected[bad].shape)} ({len(missing)} tensors missing in all)"
        )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointError(f"{p}: does not match a CLIP ViT ({len(unexpected)} unexpected tensors, e.g. "
                              f"{unexpected[:3]}); expected {FORMATS}")
    try:
        _check_clip_fits(cfg, f"of {p}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = CLIP(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def save_clip(model: CLIP, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Save as safetensors with OpenAI names and the architecture in the metadata."""
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={_META_KEY: model.cfg.key()})


def weights_fingerprint(model: CLIP) -> str:
    """A short hash of the backbone weights: architecture plus a fixed strided sample of each tensor.

    Exact bytes of float32 values are hashed, so it is the same on every machine and device.
    """
    h = hashlib.sha256(model.cfg.key().encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
