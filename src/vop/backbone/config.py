"""CLIP architectures as data: dataclasses plus a registry filled from `archs/*.json`.

Names follow open_clip (``ViT-B-32``); ``ViT-B/32`` and any case are accepted too.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from vop.errors import CheckpointError

Act = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    act: Act = "quick_gelu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)

    def key(self) -> str:
        """A canonical string of the architecture, used to check that checkpoints fit."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _canonical(name: str) -> str:
    return name.strip().replace("/", "-").lower()


def _load_registry() -> dict[str, CLIPConfig]:
    out: dict[str, CLIPConfig] = {}
    for entry in resources.files("vop.backbone").joinpath("archs").iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = CLIPConfig.from_dict(json.loads(entry.read_text()))
    return out


_REGISTRY = _load_registry()


def list_archs() -> list[str]:
    return sorted(_REGISTRY)


def is_arch(name: str) -> bool:
    return any(_canonical(k) == _canonical(name) for k in _REGISTRY)


def get_arch(name: str) -> CLIPConfig:
    for k, v in _REGISTRY.items():
        if _canonical(k) == _canonical(name):
            return v
    raise CheckpointError(
        f"unknown architecture {name!r}; known: {', '.join(list_archs())} "
        "(or give a path to a weights file)"
    )


def arch_name(cfg: CLIPConfig) -> str | None:
    """The registry name of a config, if it is one of the registered architectures."""
    for k, v in _REGISTRY.items():
        if v == cfg:
            return k
    return None


def infer_config(sd: dict[str, Any], act: Act = "quick_gelu", heads: tuple[int, int] | None = None) -> CLIPConfig:
    """Infer the architecture from an OpenAI/open_clip-named state dict (as OpenAI's build_model does).

    Head counts are not stored in the weights: they default to width // 64 (true for every released
    CLIP) unless given as ``heads=(vision_heads, text_heads)``.
    """
    try:
        conv = sd["visual.conv1.weight"]
        vwidth, patch = conv.shape[0], conv.shape[-1]
        vlayers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        grid = round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
        vmlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vwidth
        embed_dim = sd["text_projection"].shape[1]
        context = sd["positional_embedding"].shape[0]
        vocab = sd["token_embedding.weight"].shape[0]
        twidth = sd["ln_final.weight"].shape[0]
        tlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        tmlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / twidth
    except KeyError as e:
        raise CheckpointError(f"not a CLIP ViT state dict: missing key {e.args[0]!r}") from None
    vheads, theads = heads or (max(1, vwidth // 64), max(1, twidth // 64))
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=vwidth, layers=vlayers, heads=vheads, mlp_ratio=vmlp),
        text=TextConfig(context_length=context, vocab_size=vocab, width=twidth, heads=theads, layers=tlayers, mlp_ratio=tmlp),
        act=act,
    )
