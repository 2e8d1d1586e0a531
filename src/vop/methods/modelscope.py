"""The authors' released models as vop models that give the same outputs (the method side of ModelScope folders).

vop.formats.modelscope reads a folder (configuration.json, the .pth, the OpenAI name of each CLIP copy;
see there for the layout); here the folder becomes a vop model, in the order of every checkpoint:
the folder's files and weights (vop.formats) -> the backbone (its ViT-B-32.pt through vop.formats,
the architecture as the authors' code builds it, vop.backbone) -> the prompts and CLIP copies checked
against it -> the method and options -> the model (vop.methods.create_model) -> its tensors copied in.

A VoP folder becomes ``vop`` with ``semantics="modelscope"``; its CLIP copies must equal the backbone.
A VoPSE folder is plain CLIP with fine-tuned weights: its method is the first of zeroshot, proj, bias,
bias with ``attention_qkv``, partial, full whose trainable tensors cover every tensor that differs from
the backbone (the logit scale aside, it changes no embedding).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vop import formats
from vop.backbone.checkpoint import clip_config, clip_from_weights, weights_fingerprint
from vop.backbone.clip import CLIP
from vop.backbone.config import arch_name
from vop.errors import CheckpointError
from vop.formats.modelscope import (BACKBONE, CONFIG, FORMAT, TEXT_PROMPTS, TYPES, VISUAL_PROMPTS, Folder, clip_names,
                                    read_folder, read_weights)
from vop.methods.base import VideoTextModel

__all__ = ["FORMAT", "CONFIG", "BACKBONE", "Folder", "read_folder", "read_weights", "read_folder_meta", "load_folder",
           "load_folder_tensors"]

_TYPES = TYPES
_VISUAL, _TEXT = VISUAL_PROMPTS, TEXT_PROMPTS
Copies = dict[str, list[tuple[str, torch.Tensor]]]  # OpenAI name -> [(port key, tensor)]
_SE_METHODS = (("zeroshot", {}), ("proj", {}), ("bias", {}), ("bias", {"attention_qkv": True}), ("partial", {}), ("full", {}))


def _backbone_source(folder: Folder, backbone: Any) -> Any:
    """The backbone to use: as given, else the folder's ViT-B-32.pt (which must be there)."""
    if backbone is None:
        backbone = folder.path / BACKBONE
        if not backbone.is_file():
            raise CheckpointError(f"{backbone}: missing: the folder's CLIP backbone (OpenAI's {BACKBONE}); "
                                  "put it there or pass a backbone")
    return backbone


def _backbone(backbone: Any) -> CLIP:
    """A weights file is read as the authors' code reads it: 64-wide attention heads in both towers
    (their build_model); a CLIP, an architecture or a shipped name is taken as given. The file is read once
    (vop.formats), its architecture resolved (again with those heads where they differ), the CLIP built once."""
    from vop.methods import resolve_backbone

    if not (isinstance(backbone, (str, os.PathLike)) and Path(backbone).is_file()):
        return resolve_backbone(backbone)
    weights = formats.read_clip(backbone)
    cfg = clip_config(weights)
    narrow = min(cfg.vision.width, cfg.text.width)
    if narrow < 64:
        raise CheckpointError(f"{backbone}: a {narrow}-wide tower: the authors' code splits attention into 64-wide "
                              "heads (width // 64), which needs towers at least 64 wide")
    heads = (cfg.vision.width // 64, cfg.text.width // 64)
    if (cfg.vision.heads, cfg.text.heads) != heads:
        cfg = clip_config(weights, heads=heads)
    return clip_from_weights(weights, cfg)


def _clip_copies(folder: Folder, sd: dict[str, torch.Tensor], names: dict[str, str | None],
                 clip: CLIP) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """OpenAI name -> [(port key, tensor)] of every CLIP tensor in the .pth (``names``: the OpenAI name of each
    port key, vop.formats.modelscope.clip_names); rejects unknown keys and shapes."""
    ref = clip.state_dict()
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, name in names.items():
        t = sd[key]
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


def _open(path: str | os.PathLike, backbone: Any) -> tuple[Folder, dict[str, torch.Tensor], Copies, CLIP, dict[str, Any]]:
    """A folder's files, weights and names (vop.formats), its backbone (vop.backbone), the tensors checked
    against both (the numbers of configuration.json before any build), and what it is: method, options, frames."""
    folder = read_folder(path)
    source = _backbone_source(folder, backbone)
    sd = read_weights(folder)
    names = clip_names(folder, sd)
    clip = _backbone(source)
    _check_prompt_shapes(folder, sd, clip)
    copies = _clip_copies(folder, sd, names, clip)
    return folder, sd, copies, clip, _describe(folder, copies, clip, backbone)


def read_folder_meta(path: str | os.PathLike, backbone: Any = None) -> dict[str, Any]:
    """Metadata as ``read_checkpoint_meta`` gives it (method, options, frames, arch, fingerprint)."""
    return _open(path, backbone)[4]


def load_folder(path: str | os.PathLike, backbone: Any = None, check_fingerprint: bool = True) -> VideoTextModel:
    """The model of a folder, on ``backbone`` (default: the folder's ViT-B-32.pt)."""
    from vop.methods import create_model
    from vop.methods.base import private_backbone

    folder, sd, copies, clip, meta = _open(path, backbone)
    if not isinstance(backbone, CLIP):
        private_backbone(clip)  # loaded here for this model alone (a given CLIP is never changed: the model copies)
    model = create_model(meta["method"], clip, frames=meta["frames"], **meta["options"])
    _load_tensors(model, folder, sd, copies, check_fingerprint)
    return model


def load_folder_tensors(model: VideoTextModel, folder: Folder | str | os.PathLike, sd: dict[str, torch.Tensor] | None = None,
                        check: bool = True) -> None:
    """Copy a folder's trained tensors into ``model`` (built from the folder's metadata). The CLIP
    tensors it does not train must equal the backbone's (``check=False``: VoP's copies are not compared)."""
    folder = folder if isinstance(folder, Folder) else read_folder(folder)
    sd = read_weights(folder) if sd is None else sd
    _load_tensors(model, folder, sd, _clip_copies(folder, sd, clip_names(folder, sd), model.clip), check)


def _load_tensors(model: VideoTextModel, folder: Folder, sd: dict[str, torch.Tensor], copies: Copies, check: bool) -> None:
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
