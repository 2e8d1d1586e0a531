"""Prompt checkpoints: only the trainable tensors (safetensors) plus what is needed to rebuild the model.

Metadata (JSON under the ``vop`` key): method, options, frames, backbone architecture, a fingerprint
of the backbone weights the prompts were trained on, library version. A prompt file loaded onto a
different backbone or method fails with a clear message. For a method that trains every CLIP weight
(its facts say ``backbone="all"``: ``full``) the file is the whole model.

A folder instead of a file is one of the authors' released ModelScope models (vop.methods.modelscope).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, arch_name
from vop.errors import CheckpointError, ConfigError
from vop.methods.base import VideoTextModel
from vop.methods.registry import MethodFacts, method_facts

FORMAT = "vop-prompts/1"


def checkpoint_facts(path: str | os.PathLike, meta: dict[str, Any]) -> MethodFacts:
    """The facts of the method a checkpoint was written by (a CheckpointError naming the file if this
    version of vop does not know it)."""
    try:
        return method_facts(meta["method"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: written by a method this version of vop does not have ({e}); "
                              "upgrade vop or use the version that wrote it") from None


def save_checkpoint(model: VideoTextModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the trainable tensors of ``model`` and its metadata; atomic (temp file + rename)."""
    from safetensors.torch import save_file

    from vop import __version__

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {
        "format": FORMAT,
        "method": model.name,
        "options": model.options_dict(),
        "frames": model.frames,
        "arch": model.clip.cfg.to_dict(),
        "arch_name": arch_name(model.clip.cfg),
        "backbone_fingerprint": model.backbone_fingerprint,
        "counts": model.parameter_counts(),
        "vop_version": __version__,
        "torch_version": torch.__version__,
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"vop": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_checkpoint_meta(path: str | os.PathLike, backbone: CLIP | str | os.PathLike | None = None) -> dict[str, Any]:
    """A checkpoint's metadata. ``backbone`` only matters for a ModelScope folder (default: its ViT-B-32.pt)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        from vop.methods.modelscope import read_folder_meta

        return read_folder_meta(path, backbone)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such prompt checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("vop")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors prompt checkpoint ({e})") from None
    if meta is None:
        raise CheckpointError(
            f"{path}: has no vop metadata; it is not a prompt checkpoint written by vop "
            "(CLIP weights go to --backbone / load_clip instead)"
        )
    meta = json.loads(meta)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown prompt checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None


def _check_backbone(path: Path, meta: dict[str, Any], clip: CLIP, check_fingerprint: bool) -> None:
    from vop.backbone.checkpoint import weights_fingerprint

    want = CLIPConfig.from_dict(meta["arch"])
    if want != clip.cfg:
        raise CheckpointError(
            f"{path}: trained on a {meta.get('arch_name') or 'different'} backbone "
            f"({want.vision.width}-wide, {want.vision.layers}-layer image tower, patch {want.vision.patch_size}), "
            f"but the given backbone is {arch_name(clip.cfg) or 'another architecture'} "
            f"({clip.cfg.vision.width}-wide, {clip.cfg.vision.layers} layers, patch {clip.cfg.vision.patch_size}); "
            "give the backbone the prompts were trained on"
        )
    if check_fingerprint and not checkpoint_facts(path, meta).whole_model and meta.get("backbone_fingerprint"):
        got = weights_fingerprint(clip)
        if got != meta["backbone_fingerprint"]:
            raise CheckpointError(
                f"{path}: trained on backbone weights with fingerprint {meta['backbone_fingerprint']}, "
                f"the given weights have {got}: prompts only work on the exact weights they were tuned on "
                "(pass check_fingerprint=False to load anyway)"
            )


def load_checkpoint(path: str | os.PathLike, backbone: CLIP | str | os.PathLike | None = None,
                    check_fingerprint: bool = True) -> VideoTextModel:
    """Rebuild a trained model: the method and options from the file, the backbone as given.

    ``backbone`` may be omitted only for ``full`` checkpoints (they hold every weight) and for the
    authors' ModelScope folders (their backbone is in the folder).
    """
    from vop.methods import create_model, resolve_backbone

    path = Path(path)
    if path.is_dir():
        from vop.methods.modelscope import load_folder

        return load_folder(path, backbone, check_fingerprint)
    meta = read_checkpoint_meta(path)
    facts = checkpoint_facts(path, meta)
    if backbone is None:
        if not facts.whole_model:
            raise CheckpointError(f"{path}: a {meta['method']!r} checkpoint holds only prompts; give the backbone weights too")
        clip = CLIP(CLIPConfig.from_dict(meta["arch"]))
    else:
        try:  # weights are read as the recorded architecture (heads and activation are not in every file)
            clip = resolve_backbone(backbone, arch=CLIPConfig.from_dict(meta["arch"]))
        except CheckpointError as e:
            name = meta.get("arch_name") or "the recorded architecture"
            raise CheckpointError(f"{path}: cannot load its backbone ({name}) from {backbone}: {e}") from None
    _check_backbone(path, meta, clip, check_fingerprint)
    if backbone is not None and facts.trains_backbone:
        clip = copy.deepcopy(clip)  # the file overwrites backbone tensors: leave the caller's CLIP as it was
    model = create_model(meta["method"], clip, frames=meta["frames"], **meta["options"])
    load_trainable(model, path, meta)
    return model


def load_trainable(model: VideoTextModel, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's tensors into an existing model of the same method, options and backbone."""
    path = Path(path)
    meta = meta or read_checkpoint_meta(path)
    if meta["method"] != model.name:
        raise CheckpointError(f"{path}: is a {meta['method']!r} checkpoint, the model is {model.name!r}")
    saved = {**dataclasses.asdict(model.Options()), **meta["options"]}  # options added since the file: defaults
    if saved != model.options_dict() or meta["frames"] != model.frames:
        raise CheckpointError(
            f"{path}: options {saved} / frames {meta['frames']} differ from the model's "
            f"{model.options_dict()} / {model.frames}"
        )
    if CLIPConfig.from_dict(meta["arch"]) != model.clip.cfg:
        _check_backbone(path, meta, model.clip, False)
    if path.is_dir():
        from vop.methods.modelscope import load_folder_tensors

        return load_folder_tensors(model, path)
    tensors = _read_tensors(path)
    params = dict(model.named_trainable_parameters())
    if set(tensors) != set(params):
        raise CheckpointError(
            f"{path}: tensor names do not match the model's trainable tensors "
            f"(missing {sorted(set(params) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(params))[:3]})"
        )
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tensors[k].shape:
                raise CheckpointError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(p.shape)}")
            p.copy_(tensors[k])
    if type(model).facts.whole_model:
        model.backbone_fingerprint = meta.get("backbone_fingerprint")
