"""Prompt checkpoints: save a model's trainable tensors, and load a trained model, in one direction.

The bytes are vop.formats' (``vop_prompts``: safetensors + JSON metadata; ``modelscope``: the authors'
folders); this module says what the records mean and rebuilds the model:

    detect the format (vop.formats.checkpoint_format)
    -> read the records and the tensors' header (vop.formats.vop_prompts), checked against the model they
       describe, built on the meta device (nothing allocated)
    -> the architecture (vop.backbone.config) -> the backbone (vop.backbone: load_clip / build_clip)
    -> its architecture and fingerprint checked -> the method (vop.methods.create_model)
    -> the trainable tensors (vop.formats.vop_prompts.read_tensors) copied in.

Metadata: method, options, frames, backbone architecture, the backbone the model was trained on
(``backbone``: a weights path, shipped name or architecture name; null if not recorded) and a
fingerprint of its weights, library version. Files written before ``backbone`` was a field of its own
recorded it as ``extra.backbone``: :func:`read_checkpoint_meta` gives it as ``backbone``. A prompt file
loaded onto a different backbone or method fails with a clear message. For a method that trains every
CLIP weight (its facts say ``backbone="all"``: ``full``) the file is the whole model.

A folder instead of a file is one of the authors' released ModelScope models (vop.methods.modelscope).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from vop import formats
from vop._version import __version__
from vop.backbone.checkpoint import build_clip, weights_fingerprint
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, arch_name
from vop.errors import CheckpointError, ConfigError
from vop.formats import modelscope as modelscope_format
from vop.formats import vop_prompts
from vop.methods.base import VideoTextModel
from vop.methods.registry import MethodFacts, method_facts

FORMAT = vop_prompts.FORMAT


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
    extra = dict(extra or {})
    if backbone is None:
        backbone = extra.get("backbone")
    elif extra.get("backbone") is not None and str(extra["backbone"]) != str(backbone):
        raise ValueError(f"backbone {backbone!r} and extra['backbone'] {extra['backbone']!r} differ")
    meta = {
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
    if getattr(model.clip, "tokenizer_file", None) is not None:  # SigLIP: the tokenizer file it was trained with
        meta["tokenizer"] = str(Path(model.clip.tokenizer_file).resolve())
    return vop_prompts.write(model.trainable_state_dict(), meta, path)


def read_checkpoint_meta(path: str | os.PathLike, backbone: CLIP | str | os.PathLike | None = None) -> dict[str, Any]:
    """A checkpoint's metadata, with ``backbone`` (str or None) also for files that recorded it only
    in ``extra``. ``backbone`` only matters for a ModelScope folder (default: its ViT-B-32.pt)."""
    path = Path(path)
    if formats.checkpoint_format(path).name == modelscope_format.FORMAT:
        from vop.methods.modelscope import read_folder_meta

        return vop_prompts.with_backbone(read_folder_meta(path, backbone))
    meta = vop_prompts.read_meta(path)  # the format's checks: file, JSON, format, record types, frames
    recorded_arch(path, meta)
    return meta


def recorded_arch(path: str | os.PathLike, meta: dict[str, Any]) -> CLIPConfig:
    """The backbone architecture a checkpoint records (a CheckpointError naming the file if it is not usable)."""
    try:
        return CLIPConfig.from_dict(meta["arch"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: the backbone architecture its metadata records is not usable: {e}") from None


def _check_tensor_shapes(path: Path, meta: dict[str, Any], arch: CLIPConfig, got: dict[str, tuple[int, ...]]) -> None:
    """Build the recorded model on the meta device (no memory) and compare its trainable tensors, name by name
    and shape by shape, with the tensors the file holds (``got``, read from its header): a checkpoint whose
    metadata does not describe its tensors fails here, before anything is allocated."""
    from vop.methods import create_model
    from vop.methods.base import private_backbone

    try:
        with torch.device("meta"):
            model = create_model(meta["method"], private_backbone(CLIP(arch)), frames=meta["frames"], **meta["options"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: the model its metadata records cannot be built: {e}") from None
    want = {n: tuple(p.shape) for n, p in model.named_trainable_parameters()}
    if set(got) != set(want):
        raise CheckpointError(
            f"{path}: tensor names do not match the model its metadata records "
            f"(missing {sorted(set(want) - set(got))[:3]}, unexpected {sorted(set(got) - set(want))[:3]})")
    bad = next((k for k in want if got[k] != want[k]), None)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} has shape {got[bad]}, but its metadata ({meta['method']}, options "
                              f"{meta['options']}, {meta['frames']} frames) makes it {want[bad]}")


def check_backbone(path: str | os.PathLike, meta: dict[str, Any], clip: CLIP, check_fingerprint: bool = True) -> None:
    """A clear CheckpointError unless ``clip`` is the backbone a checkpoint (``meta``, read from ``path``)
    was trained on: same architecture and, with ``check_fingerprint`` and for a method that does not
    hold every weight, the same weights."""
    _check_arch(path, meta, recorded_arch(path, meta), clip)
    if check_fingerprint and not checkpoint_facts(path, meta).whole_model:
        _check_fingerprint(path, meta, clip)


def _check_arch(path: str | os.PathLike, meta: dict[str, Any], want: CLIPConfig, clip: CLIP) -> None:
    if want != clip.cfg:
        raise CheckpointError(
            f"{path}: trained on a {meta.get('arch_name') or 'different'} backbone "
            f"({want.vision.width}-wide, {want.vision.layers}-layer image tower, patch {want.vision.patch_size}), "
            f"but the given backbone is {arch_name(clip.cfg) or 'another architecture'} "
            f"({clip.cfg.vision.width}-wide, {clip.cfg.vision.layers} layers, patch {clip.cfg.vision.patch_size}); "
            "give the backbone the prompts were trained on"
        )


def _check_fingerprint(path: str | os.PathLike, meta: dict[str, Any], clip: CLIP) -> None:
    if meta.get("backbone_fingerprint"):
        got = weights_fingerprint(clip)
        if got != meta["backbone_fingerprint"]:
            raise CheckpointError(
                f"{path}: trained on backbone weights with fingerprint {meta['backbone_fingerprint']}, "
                f"the given weights have {got}: prompts only work on the exact weights they were tuned on "
                "(pass check_fingerprint=False to load anyway)"
            )


def load_checkpoint(path: str | os.PathLike, backbone: CLIP | str | os.PathLike | None = None,
                    check_fingerprint: bool = True, tokenizer: str | os.PathLike | None = None) -> VideoTextModel:
    """Rebuild a trained model: the method and options from the file, the backbone as given.

    Without ``backbone``: the one the checkpoint records (``meta["backbone"]``, as ``vop train``
    writes it); none is needed for a checkpoint that holds every weight (``full``: its facts say
    ``whole_model``) nor for the authors' ModelScope folders (their backbone is in the folder).
    ``tokenizer``: the tokenizer file of a backbone whose vocabulary vop does not ship (SigLIP); default: the
    one the checkpoint records if it still exists, else one in the backbone weights' folder.
    """
    from vop.methods import create_model, resolve_backbone
    from vop.methods.base import private_backbone

    path = Path(path)
    # 1. the format, by content (vop.formats)
    if formats.checkpoint_format(path).name == modelscope_format.FORMAT:  # the same steps, for the authors' folders
        from vop.methods.modelscope import load_folder

        return load_folder(path, backbone, check_fingerprint)
    # 2. the records and the tensors' header (vop.formats): nothing allocated
    meta = vop_prompts.read_meta(path)
    shapes = vop_prompts.tensor_shapes(path)
    # 3. the architecture (vop.backbone.config), the method's facts and the model the records describe, built on
    #    the meta device and compared with the header (vop.methods)
    arch = recorded_arch(path, meta)
    facts = checkpoint_facts(path, meta)
    _check_tensor_shapes(path, meta, arch, shapes)
    # 4. the backbone (vop.backbone), its architecture and weights checked
    source = backbone
    if source is None and not facts.whole_model:
        source = meta.get("backbone")
        if source is None:
            raise CheckpointError(f"{path}: a {meta['method']!r} checkpoint holds only prompts and records no backbone; "
                                  "give the backbone weights too")
    if tokenizer is None and isinstance(meta.get("tokenizer"), str) and Path(meta["tokenizer"]).exists():
        tokenizer = meta["tokenizer"]
    if source is None:
        clip = build_clip(arch, tokenizer=tokenizer)  # the file holds every weight: they overwrite these
    else:
        try:  # weights are read as the recorded architecture (heads and activation are not in every file)
            clip = resolve_backbone(source, arch=arch, tokenizer=tokenizer)
        except CheckpointError as e:
            name = meta.get("arch_name") or "the recorded architecture"
            recorded = "" if backbone is not None else " (the backbone recorded in the checkpoint; pass another one)"
            raise CheckpointError(f"{path}: cannot load its backbone ({name}) from {source}{recorded}: {e}") from None
    _check_arch(path, meta, arch, clip)
    if check_fingerprint and not facts.whole_model:
        _check_fingerprint(path, meta, clip)
    if not isinstance(backbone, CLIP):
        private_backbone(clip)  # built here for this model alone: it trains it in place (no copy)
    # 5. the method (vop.methods): a given CLIP is never changed, the model copies the CLIP tensors it trains;
    # 6. its trained tensors (vop.formats) copied in
    model = create_model(meta["method"], clip, frames=meta["frames"], **meta["options"])
    _check_loadable(model, path, meta, arch)
    _copy_tensors(model, path, meta, vop_prompts.read_tensors(path))
    return model


def load_trainable(model: VideoTextModel, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's tensors into an existing model of the same method, options and backbone."""
    path = Path(path)
    meta = meta or read_checkpoint_meta(path)
    _check_loadable(model, path, meta, recorded_arch(path, meta))
    if formats.checkpoint_format(path).name == modelscope_format.FORMAT:
        from vop.methods.modelscope import load_folder_tensors

        return load_folder_tensors(model, path)
    _copy_tensors(model, path, meta, vop_prompts.read_tensors(path))


def _check_loadable(model: VideoTextModel, path: Path, meta: dict[str, Any], arch: CLIPConfig) -> None:
    """Whether a checkpoint (``meta``; ``arch``: its recorded architecture) fits ``model``: method, options, frames, backbone."""
    if meta["method"] != model.name:
        raise CheckpointError(f"{path}: is a {meta['method']!r} checkpoint, the model is {model.name!r}")
    saved = {**dataclasses.asdict(model.Options()), **meta["options"]}  # options added since the file: defaults
    if saved != model.options_dict() or meta["frames"] != model.frames:
        raise CheckpointError(
            f"{path}: options {saved} / frames {meta['frames']} differ from the model's "
            f"{model.options_dict()} / {model.frames}"
        )
    if arch != model.clip.cfg:
        _check_arch(path, meta, arch, model.clip)


def _copy_tensors(model: VideoTextModel, path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A prompt checkpoint's tensors into the model's trainable parameters, name by name and shape by shape."""
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
