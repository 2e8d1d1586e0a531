"""OpenAI / open_clip names: the canonical names (``visual.conv1.weight``, ``transformer.resblocks.0...``).

The fallback of the names formats: names no other format recognises are taken as these. open_clip's
``CustomTextCLIP`` keeps the text tower under ``text.``, removed here. Whether the tensors are a CLIP
vop's towers can build is vop.backbone's to say.
"""
from __future__ import annotations

from typing import Any

from vop.formats.registry import ArchRecord, Format, Tensors, register


def to_canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Tensors, ArchRecord | None]:
    if "text.token_embedding.weight" in sd:  # open_clip CustomTextCLIP
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    return sd, None


register(Format("openai-clip", has_names=lambda sd: True, to_canonical=to_canonical, fallback=True))
