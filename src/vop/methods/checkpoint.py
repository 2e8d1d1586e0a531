"""Prompt checkpoints: only the trainable tensors (safetensors) plus what is needed to rebuild the model.

Metadata (JSON under the ``vop`` key): method, options, frames, backbone architecture, the backbone
the model was trained on (``backbone``: a weights path, shipped name or architecture name; null if not
recorded) and a fingerprint of its weights, library version. Files written before ``backbone`` was a
field of its own recorded it as ``extra.backbone``: :func:`read_checkpoint_meta` gives it as
``backbone``. A prompt file loaded onto a different backbone or method fails with a clear message.
For a method that trains every CLIP weight (its facts say ``backbone="all"``: ``full``) the file is
the whole model.

A folder instead of a file is one of the authors' released ModelScope models (vop.methods.modelscope).
"""
from __future__ import annotations

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


def backbone_record(backbone: str | os.PathLike | None) -> str | None:
    """What a checkpoint records of its backbone: an existing weights file as an absolute path (the
    checkpoint may be used from another folder), a shipped or architecture name as it is."""
    if backbone is None:
        return None
    if not isinstance(backbone, (str, os.PathLike)):
        raise TypeError(f"backbone: a weights path or a backbone name, got {type(backbone).__name__}")
    p = Path(backbone)
    return str(p.resolve()) if p.exists() else str(backbone)


def save_checkpoint(model: VideoTextModel, path: str | os.PathLike, extra: dict[str, Any] | None = None,
                    backbone: str | os.PathLike | None = None) -> Path:
    """Write the trainable tensors of ``model`` and its metadata; atomic (temp file + rename).

    ``backbone``: the CLIP weights the model was trained on (a path or name), recorded so that
    :func:`load_checkpoint` finds them again; for files of earlier callers also taken from
    ``extra["backbone"]``. ``extra``: anything else to keep with the file (dataset, epoch ...).
    """
    from safetensors.torch import save_file

    from vop import __version__

    extra = dict(extra or {})
    if backbone is None:
        backbone = extra.get("backbone")
    elif extra.get("backbone") is not None and str(extra["backbone"]) != str(backbone):
        raise ValueError(f"backbone {backbone!r} and extra['backbone'] {extra['backbone']!r} differ")
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {
        "format": FORMAT,
        "method": model.name,
        "options": model.options_dict(),
        "frames": model.frames,
        "arch": model.clip.cfg.to_dict(),
        "arch_name": arch_name(model.clip.cfg),
        "backbone": backbone_record(backbone),
        "backbone_fingerprint": model.backbone_fingerprint,
        "counts": model.parameter_counts(),
        "vop_version": __version__,
        "torch_version": torch.__version__,
        "extra": extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"vop": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_checkpoint_meta(path: str | os.PathLike, backbone: CLIP | str | os.PathLike | None = None) -> dict[str, Any]:
    """A checkpoint's metadata, with ``backbone`` (str or None) also for files that recorded it only
    in ``extra``. ``backbone`` only matters for a ModelScope folder (default: its ViT-B-32.pt)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        from vop.methods.modelscope import read_folder_meta

        return _with_backbone(read_folder_meta(path, backbone))
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
    try:
        meta = json.loads(meta)
    except ValueError as e:
        raise CheckpointError(f"{path}: its vop metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its vop metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown prompt checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    _check_meta(path, meta)
    return _with_backbone(meta)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The numbers and records a checkpoint's metadata gives, checked before anything is built from them."""
    from vop import limits

    for key, kind in (("method", str), ("options", dict), ("arch", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: its vop metadata lacks a valid {key!r} ({kind.__name__}), got "
                                  f"{type(meta.get(key)).__name__}")
    limits.check_int(meta.get("frames"), f"{path}: the frames per video its metadata records", 1, limits.MAX_FRAMES,
                     error=CheckpointError)
    recorded_arch(path, meta)


def recorded_arch(path: str | os.PathLike, meta: dict[str, Any]) -> CLIPConfig:
    """The backbone architecture a checkpoint records (a CheckpointError naming the file if it is not usable)."""
    try:
        return CLIPConfig.from_dict(meta["arch"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: the backbone architecture its metadata records is not usable: {e}") from None


def _check_tensor_shapes(path: Path, meta: dict[str, Any]) -> None:
    """Build the recorded model on the meta device (no memory) and compare its trainable tensors, name by name
    and shape by shape, with the tensors the file holds (read from its header): a checkpoint whose metadata
    does not describe its tensors fails here, before anything is allocated."""
    from safetensors import safe_open

    from vop.methods import create_model
    from vop.methods.base import private_backbone

    try:
        with torch.device("meta"):
            model = create_model(meta["method"], private_backbone(CLIP(recorded_arch(path, meta))), frames=meta["frames"],
                                 **meta["options"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: the model its metadata records cannot be built: {e}") from None
    want = {n: tuple(p.shape) for n, p in model.named_trainable_parameters()}
    try:
        with safe_open(str(path), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    if set(got) != set(want):
        raise CheckpointError(
            f"{path}: tensor names do not match the model its metadata records "
            f"(missing {sorted(set(want) - set(got))[:3]}, unexpected {sorted(set(got) - set(want))[:3]})")
    bad = next((k for k in want if got[k] != want[k]), None)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} has shape {got[bad]}, but its metadata ({meta['method']}, options "
                              f"{meta['options']}, {meta['frames']} frames) makes it {want[bad]}")


def _with_backbone(meta: dict[str, Any]) -> dict[str, Any]:
    if "backbone" not in meta:  # written before it was a field: it was in extra (if anywhere)
        meta["backbone"] = (meta.get("extra") or {}).get("backbone")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None


def check_backbone(path: str | os.PathLike, meta: dict[str, Any], clip: CLIP, check_fingerprint: bool = True) -> None:
    """A clear CheckpointError unless ``clip`` is the backbone a checkpoint (``meta``, read from ``path``)
    was trained on: same architecture and, with ``check_fingerprint`` and for a method that does not
    hold every weight, the same weights."""
    from vop.backbone.checkpoint import weights_fingerprint

    want = recorded_arch(path, meta)
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

    Without ``backbone``: the one the checkpoint records (``meta["backbone"]``, as ``vop train``
    writes it); none is needed for a checkpoint that holds every weight (``full``: its facts say
    ``whole_model``) nor for the authors' ModelScope folders (their backbone is in the folder).
    """
    from vop.methods import create_model, resolve_backbone
    from vop.methods.base import private_backbone

    path = Path(path)
    if path.is_dir():
        from vop.methods.modelscope import load_folder

        return load_folder(path, backbone, check_fingerprint)
    meta = read_checkpoint_meta(path)
    facts = checkpoint_facts(path, meta)
    _check_tensor_shapes(path, meta)
    source = backbone
    if source is None and not facts.whole_model:
        source = meta.get("backbone")
        if source is None:
            raise CheckpointError(f"{path}: a {meta['method']!r} checkpoint holds only prompts and records no backbone; "
                                  "give the backbone weights too")
    if source is None:
        from vop.backbone.checkpoint import build_clip

        clip = build_clip(recorded_arch(path, meta))  # the file holds every weight: they overwrite these
    else:
        try:  # weights are read as the recorded architecture (heads and activation are not in every file)
            clip = resolve_backbone(source, arch=recorded_arch(path, meta))
        except CheckpointError as e:
            name = meta.get("arch_name") or "the recorded architecture"
            recorded = "" if backbone is not None else " (the backbone recorded in the checkpoint; pass another one)"
            raise CheckpointError(f"{path}: cannot load its backbone ({name}) from {source}{recorded}: {e}") from None
    check_backbone(path, meta, clip, check_fingerprint)
    if not isinstance(backbone, CLIP):
        private_backbone(clip)  # built here for this model alone: it trains it in place (no copy)
    # a given CLIP is never changed: the model copies the CLIP tensors the file holds (its trained ones)
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
    if recorded_arch(path, meta) != model.clip.cfg:
        check_backbone(path, meta, model.clip, False)
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
