"""VoP^F (function-specific video prompts) and its combinations VoP^{F+P}, VoP^{F+C}.

The image tower is split by depth at ``ks`` (default 8 of 12 layers; 2/3 of the depth in general).
Layers < ks work per frame with frame-level prompts (shared for VoP^F, position-specific for F+P,
context-generated for F+C). Before layer ks a learnable frame position embedding (F x d_v) is added
to every token of frame j; layers >= ks attend jointly over the whole video, with the frozen
weights: [F CLS tokens, n_video video-level prompts, F*M patches]. ``ks = layers`` is basic VoP.

Counts on ViT-B/32 (12 frames): VoP^F 122,880, VoP^{F+P} 393,216, VoP^{F+C} 14,269,440 (our
reconstruction; the paper reports 14.1M). The frame position embedding (9,216) is trainable but,
as in the paper, reported separately.
"""
from __future__ import annotations

from dataclasses import dataclass

from vop.errors import ConfigError
from vop.methods.blocks import FunctionVideoPrompts
from vop.methods.registry import register
from vop.methods.vop import VoP
from vop.methods.vop_c import VoPC
from vop.methods.vop_p import VoPP


@dataclass
class VoPFOptions:
    n_text: int = 8
    n_video: int = 8
    ks: int | None = None  # None: round(2/3 * layers) -> 8 on ViT-B
    frame_position_std: float = 0.02  # init of the frame position embedding (the ablation in docs/results.md)


@dataclass
class VoPFPOptions(VoPFOptions):
    n_position: int = 4


@dataclass
class VoPFCOptions(VoPFOptions):
    n_context: int = 4
    context_hidden: int | None = None


class _Function:
    """Mixin: replace the per-frame video path of a VoP variant by the split (shallow/joint) one."""

    uncounted = ("frame_position",)

    def build_video(self) -> None:
        layers = self.clip.cfg.vision.layers
        ks = round(2 * layers / 3) if self.opts.ks is None else self.opts.ks
        if not 0 <= ks <= layers:
            raise ConfigError(f"model.options.ks={ks} of {self.name} must be in 0..{layers} "
                              f"(the layers of this backbone's image tower)")
        shallow = self.frame_tokens(ks) if (ks and self.opts.n_video) else None
        self.video_prompts = FunctionVideoPrompts(shallow, layers, ks, self.frames, self.opts.n_video,
                                                 self.clip.cfg.vision.width, self.opts.frame_position_std)


@register("vop-f")
class VoPF(_Function, VoP):
    Options = VoPFOptions


@register("vop-fp")
class VoPFP(_Function, VoPP):
    Options = VoPFPOptions


@register("vop-fc")
class VoPFC(_Function, VoPC):
    Options = VoPFCOptions
