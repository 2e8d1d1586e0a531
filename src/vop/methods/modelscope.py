"""The authors' released models: ModelScope model folders as vop models that give the same outputs.

A folder (``damo/cv_vit-b32_retrieval_vop``, ``..._vop_bias``, ``..._vop_proj``, ``..._vop_partial``;
code in modelscope/models/cv/vop_retrieval) holds:

- ``configuration.json``: ``model.type`` and a ``hyperparam`` section (``num_frames``, ``input_res``,
  ``pooling_type``; for VoP also ``vp_token_num``, ``tp_prefix_token_num``, ``tp_suffix_token_num``);
- ``ViT-B-32.pt``: OpenAI's CLIP archive, the backbone;
- ``VoP_<data>.pth`` (basic VoP, type ``vop-retrieval-model``) or ``VoPSE_<data>.pth`` (the baselines,
  type ``vop-retrieval-model-se``): ``{"state_dict": ...}`` of the whole port model, keys possibly
  ``module.``-prefixed. VoP: ``visual_prompt_learner.visual_prompts`` (L, 1, n_v, d_v),
  ``text_prompt_learner.text_prompts`` (L, n_prefix + n_suffix, d_t) and copies of the frozen CLIP
  under ``clip.``, ``image_encoder.`` (= ``visual.``) and ``text_encoder.``. VoPSE: a complete CLIP
  under ``clip.``.

A VoP folder becomes ``vop`` with ``semantics="modelscope"``; its CLIP copies must equal the backbone.
A VoPSE folder is plain CLIP with fine-tuned weights: its method is the first of zeroshot, proj, bias,
bias with ``attention_qkv``, partial, full whose trainable tensors cover every tensor that differs from
the backbone (the logit scale aside, it changes no embedding). Weights are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vop.backbone.clip import CLIP
from vop.backbone.config import arch_name
from vop import limits
from vop.errors import CheckpointError
from vop.methods.base import VideoTextModel

FORMAT = "modelscope-vop"
CONFIG, BACKBONE = "configuration.json", "ViT-B-32.pt"
_TYPES = {"vop": "vop-retrieval-model", "se": "vop-retrieval-model-se"}
_HYPER = {"vop": ("vp_token_num", "tp_prefix_token_num", "tp_suffix_token_num", "num_frames", "input_res"),
          "se": ("num_frames", "input_res")}  # integers; pooling_type too
_SE_METHODS = (("zeroshot", {}), ("proj", {}), ("bias", {}), ("bias", {"attention_qkv": True}), ("partial", {}), ("full", {}))
#: what the hyperparameters may be (vop.limits): prompt counts and frames as vop's own options, sizes as an architecture's
_BOUNDS = {"vp_token_num": (0, limits.MAX_PROMPT_TOKENS), "tp_prefix_token_num": (0, limits.MAX_CONTEXT),
           "tp_suffix_token_num": (0, limits.MAX_CONTEXT), "num_frames": (1, limits.MAX_FRAMES),
           "input_res": (1, limits.MAX_IMAGE_SIZE)}
_CLIP_COPIES = {"clip.": "", "image_encoder.": "visual.", "text_encoder.": ""}  # port prefix -> OpenAI name prefix
_VISUAL, _TEXT = "visual_prompt_learner.visual_prompts", "text_prompt_learner.text_prompts"


@dataclass
class Folder:
    path: Path
    layout: str  # "vop" or "se"
    weights: Path  # the .pth
    hyperparam: dict[str, Any]

    @property
    def config(self) -> Path:
        return self.path / CONFIG


def read_folder(path: str | os.PathLike) -> Folder:
    """Find and check a folder's files and hyperparameters (reads no weights)."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path}: is a folder without {CONFIG}, not one of the authors' ModelScope model folders "
            f"({CONFIG}, {BACKBONE} and VoP_*.pth or VoPSE_*.pth); or give a prompt checkpoint (.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
    hp = cfg.get("hyperparam") if isinstance(cfg, dict) else None
    if not isinstance(hp, dict):
        raise CheckpointError(f"{cfg_file}: has no 'hyperparam' section (the authors' model settings)")
    found = sorted(path.glob("VoP_*.pth")) + sorted(path.glob("VoPSE_*.pth"))
    if len(found) != 1:
        what = "no weights file" if not found else f"several weights files ({', '.join(f.name for f in found)})"
        raise CheckpointError(f"{path}: {what}; expected one VoP_*.pth (VoP) or VoPSE_*.pth (the bias/proj/partial baselines)")
    layout = "se" if found[0].name.startswith("VoPSE_") else "vop"
    model = cfg.get("model")
    mtype = model.get("type") if isinstance(model, dict) else None
    if mtype is not None and mtype != _TYPES[layout]:
        raise CheckpointError(f"{cfg_file}: model type {mtype!r}, but {found[0].name} is a {_TYPES[layout]!r}")
    missing = [k for k in (*_HYPER[layout], "pooling_type") if k not in hp]
    if missing:
        raise CheckpointError(f"{cfg_file}: hyperparam lacks {', '.join(missing)}")
    for k in _HYPER[layout]:
        lo, hi = _BOUNDS[k]
        limits.check_int(hp[k], f"{cfg_file}: hyperparam {k}", lo, hi, error=CheckpointError)
    if hp["pooling_type"] != "avg":
        raise CheckpointError(f"{cfg_file}: pooling_type {hp['pooling_type']!r} is not supported (the authors' code has only "
                              "'avg': the mean of the L2-normalised frame embeddings)")
    return Folder(path, layout, found[0], hp)


def read_weights(folder: Folder) -> dict[str, torch.Tensor]:
    """The .pth's state dict, ``module.`` removed (as the authors' loader does)."""
    f = folder.weights
    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot be read with torch.load(weights_only=True) ({reason})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    sd = sd if isinstance(sd, Mapping) else {}
    bad = next((k for k, v in sd.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"{f}: a tensor is stored under the key {bad!r} ({type(bad).__name__}), not a name: "
                              "not a state dict the authors' code writes")
    tensors = {k.replace("module.", ""): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{f}: holds no tensors (expected {{'state_dict': {{name: tensor}}}}, as the authors' code saves)")
    return tensors


def _backbone(folder: Folder, backbone: Any) -> CLIP:
    """A weights file is read as the authors' code reads it: 64-wide attention heads in both towers
    (their build_model); a CLIP, an architecture or a shipped name is taken as given."""
    from vop.backbone.checkpoint import load_clip
    from vop.methods import resolve_backbone

    if backbone is None:
        backbone = folder.path / BACKBONE
        if not backbone.is_file():
            raise CheckpointError(f"{backbone}: missing: the folder's CLIP backbone (OpenAI's {BACKBONE}); "
                                  "put it there or pass a backbone")
    if not (isinstance(backbone, (str, os.PathLike)) and Path(backbone).is_file()):
        return resolve_backbone(backbone)
    clip = load_clip(backbone)
    narrow = min(clip.cfg.vision.width, clip.cfg.text.width)
    if narrow < 64:
        raise CheckpointError(f"{backbone}: a {narrow}-wide tower: the authors' code splits attention into 64-wide "
                              "heads (width // 64), which needs towers at least 64 wide")
    heads = (clip.cfg.vision.width // 64, clip.cfg.text.width // 64)
    return clip if (clip.cfg.vision.heads, clip.cfg.text.heads) == heads else load_clip(backbone, heads=heads)


def _clip_copies(folder: Folder, sd: dict[str, torch.Tensor], clip: CLIP) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """OpenAI name -> [(port key, tensor)] of every CLIP tensor in the .pth; rejects unknown keys and shapes."""
    ref = clip.state_dict()
    prompts = (_VISUAL, _TEXT) if folder.layout == "vop" else ()
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        if key in prompts:
            continue
        prefix = next((p for p in _CLIP_COPIES if key.startswith(p)), None)
        if folder.layout == "se" and prefix != "clip.":
            prefix = None  # a VoPSE model holds nothing but its CLIP
        name = _CLIP_COPIES[prefix] + key[len(prefix):] if prefix else None
        if name not in ref:
            raise CheckpointError(f"{folder.weights}: unexpected tensor {key!r} for a {_TYPES[folder.layout]!r}")
        if t.shape != ref[name].shape:
            raise CheckpointError(f"{folder.weights}: {key} has shape {tuple(t.shape)}, the backbone's {name} is "
                                  f"{tuple(ref[name].shape)}: not the backbone these weights belong to")
        out.setdefault(name, []).append((key, t))
    if folder.layout == "se" and len(out) < len(ref):
        missing = sorted(set(ref) - set(out))
        raise CheckpointError(f"{folder.weights}: lacks {len(missing)} CLIP tensors (e.g. clip.{missing[0]}); "
                              "a VoPSE checkpoint holds the whole CLIP")
    return out


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    """VoPSE: an untrained tensor, bit for bit; VoP: the frozen CLIP, up to fp16 storage."""
    a, b = a.float(), b.float()
    return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def _se_method(folder: Folder, copies: dict[str, list[tuple[str, torch.Tensor]]], clip: CLIP) -> tuple[str, dict[str, Any]]:
    from vop.methods import create_model

    ref = clip.state_dict()
    changed = {n for n, found in copies.items() if n != "logit_scale" and not _same(found[-1][1], ref[n], exact=True)}
    from vop.methods.base import private_backbone

    for method, options in _SE_METHODS:
        with torch.device("meta"):
            m = create_model(method, private_backbone(CLIP(clip.cfg)), **options)
        if changed <= {n[len("clip."):] for n, _ in m.named_trainable_parameters()}:
            return method, m.options_dict()
    raise AssertionError("full trains every tensor")  # pragma: no cover


def _describe(folder: Folder, copies: dict[str, list[tuple[str, torch.Tensor]]], clip: CLIP, backbone: Any) -> dict[str, Any]:
    from vop.backbone.checkpoint import weights_fingerprint

    hp = folder.hyperparam
    if hp["input_res"] != clip.cfg.vision.image_size:
        raise CheckpointError(f"{folder.config}: input_res {hp['input_res']}, but the backbone takes "
                              f"{clip.cfg.vision.image_size} px frames")
    if folder.layout == "vop":
        p, s = hp["tp_prefix_token_num"], hp["tp_suffix_token_num"]
        method, options = "vop", {"n_text": p + s, "n_video": hp["vp_token_num"], "depth": None,
                                  "semantics": "modelscope", "n_text_suffix": s}
    else:  # no prompts: captions use CLIP's whole context, whatever tp_*_token_num say
        method, options = _se_method(folder, copies, clip)
    if backbone is None:
        backbone = folder.path / BACKBONE
    return {
        "format": FORMAT,
        "method": method,
        "options": options,
        "frames": hp["num_frames"],
        "arch": clip.cfg.to_dict(),
        "arch_name": arch_name(clip.cfg),
        "backbone_fingerprint": weights_fingerprint(clip),
        "extra": {"backbone": None if isinstance(backbone, CLIP) else str(backbone),
                  "modelscope": {"layout": folder.layout, "weights": folder.weights.name, "hyperparam": hp}},
    }


def read_folder_meta(path: str | os.PathLike, backbone: Any = None) -> dict[str, Any]:
    """Metadata as ``read_checkpoint_meta`` gives it (method, options, frames, arch, fingerprint)."""
    folder = read_folder(path)
    clip = _backbone(folder, backbone)
    sd = read_weights(folder)
    _check_prompt_shapes(folder, sd, clip)
    return _describe(folder, _clip_copies(folder, sd, clip), clip, backbone)


def load_folder(path: str | os.PathLike, backbone: Any = None, check_fingerprint: bool = True) -> VideoTextModel:
    """The model of a folder, on ``backbone`` (default: the folder's ViT-B-32.pt)."""
    from vop.methods import create_model
    from vop.methods.base import private_backbone

    folder = read_folder(path)
    clip = _backbone(folder, backbone)
    sd = read_weights(folder)
    _check_prompt_shapes(folder, sd, clip)  # the numbers of configuration.json against the tensors, before any build
    meta = _describe(folder, _clip_copies(folder, sd, clip), clip, backbone)
    if not isinstance(backbone, CLIP):
        private_backbone(clip)  # loaded here for this model alone (a given CLIP is never changed: the model copies)
    model = create_model(meta["method"], clip, frames=meta["frames"], **meta["options"])
    load_folder_tensors(model, folder, sd, check=check_fingerprint)
    return model


def load_folder_tensors(model: VideoTextModel, folder: Folder | str | os.PathLike, sd: dict[str, torch.Tensor] | None = None,
                        check: bool = True) -> None:
    """Copy a folder's trained tensors into ``model`` (built from the folder's metadata). The CLIP
    tensors it does not train must equal the backbone's (``check=False``: VoP's copies are not compared)."""
    folder = folder if isinstance(folder, Folder) else read_folder(folder)
    sd = read_weights(folder) if sd is None else sd
    copies = _clip_copies(folder, sd, model.clip)
    params = dict(model.named_trainable_parameters())
    ref = model.clip.state_dict()
    with torch.no_grad():
        if folder.layout == "vop":
            _load_prompts(model, folder, sd, params)
        for name, found in copies.items():
            target = params.get("clip." + name)
            if target is not None:
                target.copy_(found[-1][1])  # the port loads its copies in this order: the last one counts
                continue
            if name == "logit_scale" or not (check or folder.layout == "se"):
                continue
            for key, t in found:
                if not _same(t, ref[name], exact=folder.layout == "se"):
                    hint = " (check_fingerprint=False loads the prompts anyway)" if folder.layout == "vop" else ""
                    raise CheckpointError(f"{folder.weights}: its {key} differs from the backbone's {name}: these weights "
                                          f"were trained on another CLIP than the one given{hint}")


def _prompt_shapes(folder: Folder, clip: CLIP) -> tuple[tuple[str, str, tuple[int, ...], str], ...]:
    """(key in the .pth, our parameter, its shape per configuration.json and the backbone, what it is)."""
    hp, v, t = folder.hyperparam, clip.cfg.vision, clip.cfg.text
    n_text = hp["tp_prefix_token_num"] + hp["tp_suffix_token_num"]
    return ((_VISUAL, "video_prompts.source.shared", (v.layers, 1, hp["vp_token_num"], v.width), "video prompts"),
            (_TEXT, "text_prompts.tokens", (t.layers, n_text, t.width), "text prompts"))


def _check_prompt_shapes(folder: Folder, sd: dict[str, torch.Tensor], clip: CLIP) -> None:
    """A VoP folder's prompt tensors must be what its configuration.json says (prompt counts) on this backbone."""
    if folder.layout != "vop":
        return
    for key, _, shape, what in _prompt_shapes(folder, clip):
        if key not in sd:
            raise CheckpointError(f"{folder.weights}: lacks {key} (the {what})")
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(f"{folder.weights}: {key} has shape {tuple(sd[key].shape)}, expected {shape} "
                                  f"({shape[-2]} {what} of width {shape[-1]} in each of {shape[0]} layers, per {CONFIG} "
                                  "and the backbone): the weights and the folder's settings do not belong together")


def _load_prompts(model: VideoTextModel, folder: Folder, sd: dict[str, torch.Tensor],
                  params: dict[str, torch.nn.Parameter]) -> None:
    hp, v, t = folder.hyperparam, model.clip.cfg.vision, model.clip.cfg.text
    n_text = hp["tp_prefix_token_num"] + hp["tp_suffix_token_num"]
    for key, ours, shape, what in (
        (_VISUAL, "video_prompts.source.shared", (v.layers, 1, hp["vp_token_num"], v.width), "video prompts"),
        (_TEXT, "text_prompts.tokens", (t.layers, n_text, t.width), "text prompts"),
    ):
        if key not in sd:
            raise CheckpointError(f"{folder.weights}: lacks {key} (the {what})")
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(f"{folder.weights}: {key} has shape {tuple(sd[key].shape)}, expected {shape} "
                                  f"({shape[-2]} {what} of width {shape[-1]} in each of {shape[0]} layers, per {CONFIG})")
        if sd[key].numel():
            params[ours].copy_(sd[key].reshape(params[ours].shape))
