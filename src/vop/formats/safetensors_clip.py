"""``.safetensors`` CLIP weights (recognised by the header, whatever the name).

Any names (OpenAI / open_clip, Hugging Face: the names formats convert them). The files vop writes
(``vop.save_clip``) carry the architecture as JSON in the metadata under ``vop_clip_config``
(``CLIPConfig.to_dict``'s layout), read here as an :class:`~vop.formats.registry.ArchRecord`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vop.errors import CheckpointError
from vop.formats.registry import ArchRecord, Format, Tensors, register

META_KEY = "vop_clip_config"


def is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < (1 << 30) and head[8:9] == b"{"


def read(path: Path) -> tuple[Tensors, dict[str, Any]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


def arch_record(meta: dict[str, Any]) -> ArchRecord | None:
    """The architecture record of our own files (metadata ``vop_clip_config``), parsed."""
    if META_KEY not in meta:
        return None
    try:
        record = json.loads(meta[META_KEY])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"its architecture record (metadata {META_KEY}) is not valid JSON ({e}); "
                              "re-save the weights with vop.save_clip, or remove the record to infer the "
                              "architecture from the tensors") from None
    return ArchRecord(record, f"its architecture record (metadata {META_KEY}) is not usable")


def write(tensors: Tensors, path: str | os.PathLike, arch: str) -> None:
    """Save ``tensors`` (canonical names) with the architecture record ``arch`` (``CLIPConfig.key()``)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={META_KEY: arch})


register(Format("safetensors", "a .safetensors file", is_file=is_safetensors, read_file=read, arch_record=arch_record))
