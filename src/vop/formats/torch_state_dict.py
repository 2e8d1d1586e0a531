"""open_clip / plain PyTorch state dicts (``.pt``, ``.pth``, ``.bin``, whatever the name).

As saved by open_clip or ``torch.save``, optionally wrapped in ``{"state_dict": ...}`` /
``{"model": ...}`` / ``{"module": ...}``; read with ``torch.load(weights_only=True)`` (never arbitrary
unpickling; torch 2.13 refuses a TorchScript archive there, it never dispatches to ``torch.jit.load``).
The fallback of the file formats: a file no other format recognises is tried here, so an unreadable
file gets torch.load's reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from vop.errors import CheckpointError
from vop.formats.registry import Format, Tensors, expected, register


def unwrap(obj: Any, path: Path) -> Tensors:
    """The tensors of a loaded object: the mapping itself, or the one under state_dict / model / module."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj.get(key), torch.Tensor):
                return unwrap(obj[key], path)
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if sd:
            return sd
    raise CheckpointError(f"{path}: holds no tensors; expected {expected()}")


def read(path: Path) -> tuple[Tensors, dict[str, Any]]:
    return unwrap(torch.load(str(path), map_location="cpu", weights_only=True), path), {}


register(Format("state-dict", "an open_clip/PyTorch state dict (.pt/.pth/.bin)", is_file=lambda path: True,
                read_file=read, fallback=True))
