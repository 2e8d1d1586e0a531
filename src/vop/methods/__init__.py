"""Every method of the paper, one registry. ``create_model(method, backbone, frames=12, **options)``."""
from __future__ import annotations

import os
from typing import Any

import torch

from vop.backbone.checkpoint import build_clip, load_clip, weights_fingerprint
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, is_arch
from vop.errors import ConfigError
# Registration, in the order of the paper's Table 1. A new method: one module + one line here.
from vop.methods import baselines  # noqa: F401,I001
from vop.methods import adapters  # noqa: F401
from vop.methods import vop  # noqa: F401  (the six VoP variants)
from vop.methods import dgl  # noqa: F401  (DGL, AAAI'24: dgl, dgl-l)
from vop.methods import mv_adapter  # noqa: F401  (MV-Adapter, CVPR'24)
from vop.methods import cma  # noqa: F401  (Cross-Modal Adapter, arXiv'22 / PR'25)
from vop.methods import lora  # noqa: F401  (LoRA on the fused q/k/v, as TempMe / DiscoVLA place it)
from vop.methods import tempme  # noqa: F401  (TempMe, ICLR'25)
from vop.methods.base import VideoTextModel
from vop.methods.registry import (MethodFacts, Rates, broken_plugins, get_method, list_methods, method_facts, parse_options,
                                  plugin_errors, plugin_of, register)

__all__ = ["create_model", "list_methods", "get_method", "method_facts", "MethodFacts", "Rates", "register",
           "VideoTextModel", "resolve_backbone", "broken_plugins", "plugin_of"]


def resolve_backbone(backbone: CLIP | CLIPConfig | str | os.PathLike, arch: str | CLIPConfig | None = None) -> CLIP:
    """A CLIP instance as is; a weights path or shipped name loaded (``arch``: its architecture, see
    ``load_clip``; used for weights only); an architecture name (or config) built with random weights
    drawn with seed 0 (for shapes, counts and tests: the same "random backbone" every time, so its
    prompt checkpoints load again)."""
    if isinstance(backbone, CLIP):
        return backbone
    if isinstance(backbone, CLIPConfig):
        return build_clip(backbone, seed=0)
    if isinstance(backbone, str) and is_arch(backbone) and not os.path.exists(backbone):
        return build_clip(backbone, seed=0)
    return load_clip(backbone, arch=arch)


def create_model(method: str, backbone: CLIP | CLIPConfig | str | os.PathLike = "ViT-B/32", frames: int = 12,
                 **options: Any) -> VideoTextModel:
    """Build ``method`` on ``backbone``: everything frozen except what the method trains.

    The model has ``encode_text(tokens)``, ``encode_video(videos B x F x 3 x H x W)``,
    ``tokenizer()`` (with the caption budget shrunk by the text prompts) and ``trainable_parameters()``.
    """
    cls = get_method(method)
    with plugin_errors(method):  # a third-party method's failure: one ConfigError naming its plugin
        opts = parse_options(method, cls.Options, options)
    clip = resolve_backbone(backbone)
    device = next(clip.parameters()).device
    with plugin_errors(method):  # a third-party method's failure: one ConfigError naming its plugin
        if device.type != "meta":  # the new tensors must fit where the backbone is: counted on the meta device first
            check_new_parameters(method, cls, opts, clip.cfg, frames, device)
        model = cls(clip, frames=frames, options=opts)
    if next(clip.parameters()).device.type != "meta":
        model.backbone_fingerprint = weights_fingerprint(clip)
        # new modules live where the backbone lives
        model.to(next(clip.parameters()).device)
    return model


def _new_parameters(cls: type[VideoTextModel], opts: Any, cfg: CLIPConfig, frames: int) -> int:
    """The method's own (non-CLIP) parameters, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = cls(CLIP(cfg), frames=frames, options=opts)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))


def large_options(cls: type[VideoTextModel], opts: Any, cfg: CLIPConfig, frames: int) -> list[str]:
    """The settings that make a method's new tensors large: each option (and ``frames``) that, set back to its
    default, at least halves their count (``model.options.mid=4096 (default 64)``)."""
    import dataclasses

    n = _new_parameters(cls, opts, cfg, frames)
    defaults, out = cls.Options(), []
    for f in dataclasses.fields(opts):
        value, default = getattr(opts, f.name), getattr(defaults, f.name)
        if value != default:
            try:
                smaller = _new_parameters(cls, dataclasses.replace(opts, **{f.name: default}), cfg, frames)
            except ConfigError:
                continue
            if smaller * 2 <= n:
                out.append(f"model.options.{f.name}={value!r} (default {default!r})")
    if frames > 12 and _new_parameters(cls, opts, cfg, 12) * 2 <= n:
        out.append(f"model.frames={frames}")
    return out


def check_new_parameters(method: str, cls: type[VideoTextModel], opts: Any, cfg: CLIPConfig, frames: int,
                         device: torch.device) -> None:
    """Build ``method`` on the meta device (no memory) and refuse, with the options that make it large, if its
    new tensors would not fit in the memory ``device`` has free (vop.memory.check_fits)."""
    from vop.memory import check_fits

    n = _new_parameters(cls, opts, cfg, frames)

    def hint() -> str:
        culprits = large_options(cls, opts, cfg, frames)
        return ("lower " + ", ".join(culprits)) if culprits else "use smaller options or a smaller backbone"

    check_fits(4 * n, device, f"{method}'s new tensors ({n:,} float32 parameters)", hint)


def count_parameters(method: str, arch: str | CLIPConfig = "ViT-B-32", frames: int = 12, **options: Any) -> dict[str, int]:
    """Parameter counts of a method on an architecture, without allocating any weights."""
    from vop.backbone.config import get_arch

    cfg = get_arch(arch) if isinstance(arch, str) else arch
    with torch.device("meta"):
        model = create_model(method, CLIP(cfg), frames=frames, **options)
    return model.parameter_counts()
