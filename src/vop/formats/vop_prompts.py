"""vop's prompt checkpoints: the trainable tensors (safetensors) plus JSON metadata under the ``vop`` key.

The metadata (``format: "vop-prompts/1"``): method, options, frames, the backbone architecture
(``arch``, ``CLIPConfig.to_dict``'s layout) and its registry name, the backbone the model was trained
on (``backbone``: a weights path, shipped name or architecture name; null if not recorded) and a
fingerprint of its weights, parameter counts, versions, ``extra``. Files written before ``backbone``
was a field of its own recorded it as ``extra.backbone``: :func:`read_meta` gives it as ``backbone``.
The fallback of the checkpoint formats: anything that is not a folder is read as one of these.

Read here: the metadata (its record types and frame count checked), the tensors' names and shapes
(from the header: nothing allocated) and the tensors; written here, atomically. What the records
mean (the method, its tensors, the architecture) is vop.methods' and vop.backbone's to say.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vop import limits
from vop.errors import CheckpointError
from vop.formats.registry import Format, Tensors, register

FORMAT = "vop-prompts/1"
META_KEY = "vop"


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a prompt checkpoint, its record types and frame count checked, with ``backbone``
    (str or None) also for files that recorded it only in ``extra``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such prompt checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
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
    for key, kind in (("method", str), ("options", dict), ("arch", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: its vop metadata lacks a valid {key!r} ({kind.__name__}), got "
                                  f"{type(meta.get(key)).__name__}")
    limits.check_int(meta.get("frames"), f"{path}: the frames per video its metadata records", 1, limits.MAX_FRAMES,
                     error=CheckpointError)
    return with_backbone(meta)


def with_backbone(meta: dict[str, Any]) -> dict[str, Any]:
    if "backbone" not in meta:  # written before it was a field: it was in extra (if anywhere)
        meta["backbone"] = (meta.get("extra") or {}).get("backbone")
    return meta


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the file holds, from its header (nothing allocated)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None


def tensor_names(path: str | os.PathLike) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def read_tensors(path: str | os.PathLike) -> Tensors:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None


def write(tensors: Tensors, meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``tensors`` (moved to the CPU, contiguous) and ``meta`` (its ``format`` set); atomic (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps({"format": FORMAT, **meta})})
    os.replace(tmp, path)
    return path


register(Format(FORMAT, is_checkpoint=lambda path: True, fallback=True))
