"""Every method of the paper, one registry. ``create_model(method, backbone, frames=12, **options)``."""
from __future__ import annotations

import os
from typing import Any

import torch

from vop.backbone.checkpoint import build_clip, load_clip, weights_fingerprint
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, is_arch
# Registration, in the order of the paper's Table 1. A new method: one module + one line here.
from vop.methods import baselines  # noqa: F401,I001
from vop.methods import adapters  # noqa: F401
from vop.methods import vop  # noqa: F401  (the six VoP variants)
from vop.methods import dgl  # noqa: F401  (DGL, AAAI'24: dgl, dgl-l)
from vop.methods import mv_adapter  # noqa: F401  (MV-Adapter, CVPR'24)
from vop.methods import cma  # noqa: F401  (Cross-Modal Adapter, arXiv'22 / PR'25)
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
    with plugin_errors(method):
        model = cls(clip, frames=frames, options=opts)
    if next(clip.parameters()).device.type != "meta":
        model.backbone_fingerprint = weights_fingerprint(clip)
        # new modules live where the backbone lives
        model.to(next(clip.parameters()).device)
    return model


def count_parameters(method: str, arch: str | CLIPConfig = "ViT-B-32", frames: int = 12, **options: Any) -> dict[str, int]:
    """Parameter counts of a method on an architecture, without allocating any weights."""
    from vop.backbone.config import get_arch

    cfg = get_arch(arch) if isinstance(arch, str) else arch
    with torch.device("meta"):
        model = create_model(method, CLIP(cfg), frames=frames, **options)
    return model.parameter_counts()
