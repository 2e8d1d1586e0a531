"""Every method of the paper, one registry. ``create_model(method, backbone, frames=12, **options)``.

A method module (one of vop's own below, or a plugin) imports what it needs from here:
``from vop.methods import Expected, Rates, VideoTextModel, register``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from vop.backbone.checkpoint import attach_tokenizer, build_clip, load_clip, weights_fingerprint
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, is_arch
from vop.errors import ConfigError
# first what a method module imports (``from vop.methods import register, Rates, VideoTextModel`` works in one)
from vop.methods.base import VideoTextModel, is_private_backbone, private_backbone
from vop.methods.registry import (Expected, MethodFacts, Rates, broken_plugins, get_method, list_methods, method_facts,
                                  parse_options, plugin_errors, plugin_of, register)

__all__ = ["create_model", "list_methods", "get_method", "method_facts", "MethodFacts", "Rates", "Expected", "register",
           "VideoTextModel", "resolve_backbone", "broken_plugins", "plugin_of"]


def resolve_backbone(backbone: CLIP | CLIPConfig | str | os.PathLike, arch: str | CLIPConfig | None = None,
                     tokenizer: str | os.PathLike | None = None) -> CLIP:
    """A CLIP instance as is; a weights path or shipped name loaded (``arch``: its architecture, see
    ``load_clip``; used for weights only); an architecture name (or config) built with random weights
    drawn with seed 0 (for shapes, counts and tests: the same "random backbone" every time, so its
    prompt checkpoints load again). ``tokenizer``: the tokenizer file of a text tower whose vocabulary vop
    does not ship (SigLIP; see ``load_clip``), given to the CLIP (an instance gets it too)."""
    if isinstance(backbone, CLIP):
        return attach_tokenizer(backbone, tokenizer, error=ConfigError) if tokenizer is not None else backbone
    if isinstance(backbone, CLIPConfig):
        return build_clip(backbone, seed=0, tokenizer=tokenizer)
    if isinstance(backbone, str) and is_arch(backbone) and not os.path.exists(backbone):
        return build_clip(backbone, seed=0, tokenizer=tokenizer)
    return load_clip(backbone, arch=arch, tokenizer=tokenizer)


def create_model(method: str, backbone: CLIP | CLIPConfig | str | os.PathLike = "ViT-B/32", frames: int = 12,
                 **options: Any) -> VideoTextModel:
    """Build ``method`` on ``backbone``: everything frozen except what the method trains.

    The model has ``encode_text(tokens)``, ``encode_video(videos B x F x 3 x H x W)``,
    ``tokenizer()`` (with the caption budget shrunk by the text prompts) and ``trainable_parameters()``.

    The ``backbone`` given as a CLIP instance is never changed (its ``requires_grad`` flags, values, device
    or mode): the model shares its frozen tensors (no memory copied) and owns copies of those it trains
    (``VideoTextModel.trains_clip``). A name or file is loaded for this model alone, which then trains it in place.
    """
    cls = get_method(method)
    with plugin_errors(method):  # a third-party method's failure: one ConfigError naming its plugin
        opts = parse_options(method, cls.Options, options)
    private = not isinstance(backbone, CLIP) or is_private_backbone(backbone)  # nothing else holds it
    clip = resolve_backbone(backbone)
    device = next(clip.parameters()).device
    with plugin_errors(method):  # a third-party method's failure: one ConfigError naming its plugin
        if device.type != "meta":  # the new tensors must fit where the backbone is: counted on the meta device first
            check_new_parameters(method, cls, opts, clip.cfg, frames, device, copies=not private)
    fingerprint = weights_fingerprint(clip) if device.type != "meta" else None  # the given backbone's, as given
    with plugin_errors(method):
        model = cls(private_backbone(clip) if private else clip, frames=frames, options=opts)
    if device.type != "meta":
        model.backbone_fingerprint = fingerprint
        # new modules live where the backbone lives
        model.to(device)
    return model


def _meta_counts(cls: type[VideoTextModel], opts: Any, cfg: CLIPConfig, frames: int) -> tuple[int, int]:
    """(the method's own, non-CLIP, parameters; the CLIP parameters it trains), counted on the meta device."""
    with torch.device("meta"):
        model = cls(private_backbone(CLIP(cfg)), frames=frames, options=opts)
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))
    return own, sum(p.numel() for p in model.clip.parameters() if p.requires_grad)


def _new_parameters(cls: type[VideoTextModel], opts: Any, cfg: CLIPConfig, frames: int) -> int:
    """The method's own (non-CLIP) parameters, counted on the meta device (no memory)."""
    return _meta_counts(cls, opts, cfg, frames)[0]


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
                         device: torch.device, copies: bool = False) -> None:
    """Build ``method`` on the meta device (no memory) and refuse, with the options that make it large, if its
    new tensors (with ``copies``: and its copies of the CLIP tensors it trains) would not fit in the memory
    ``device`` has free (vop.memory.check_fits)."""
    from vop.memory import check_fits

    n, trained = _meta_counts(cls, opts, cfg, frames)
    copied = trained if copies else 0

    def hint() -> str:
        culprits = large_options(cls, opts, cfg, frames)
        return ("lower " + ", ".join(culprits)) if culprits else "use smaller options or a smaller backbone"

    what = f"{method}'s new tensors ({n + copied:,} float32 parameters"
    what += f", {copied:,} of them its copies of the CLIP tensors it trains)" if copied else ")"
    check_fits(4 * (n + copied), device, what, hint)


def count_parameters(method: str, arch: str | CLIPConfig = "ViT-B-32", frames: int = 12, **options: Any) -> dict[str, int]:
    """Parameter counts of a method on an architecture, without allocating any weights."""
    from vop.backbone.config import get_arch

    cfg = get_arch(arch) if isinstance(arch, str) else arch
    with torch.device("meta"):
        model = create_model(method, private_backbone(CLIP(cfg)), frames=frames, **options)
    return model.parameter_counts()

# Registration, in the order of the paper's Table 1. A method shipped with vop: one module + one line here.
from vop.methods import baselines  # noqa: E402,F401,I001
from vop.methods import adapters  # noqa: E402,F401
from vop.methods import vop  # noqa: E402,F401  (the six VoP variants)
from vop.methods import dgl  # noqa: E402,F401  (DGL, AAAI'24: dgl, dgl-l)
from vop.methods import mv_adapter  # noqa: E402,F401  (MV-Adapter, CVPR'24)
from vop.methods import cma  # noqa: E402,F401  (Cross-Modal Adapter, arXiv'22 / PR'25)
from vop.methods import lora  # noqa: E402,F401  (LoRA on the fused q/k/v, as TempMe / DiscoVLA place it)
from vop.methods import tempme  # noqa: E402,F401  (TempMe, ICLR'25)
