"""Basic VoP: deep prompts in every layer of both encoders (text: after [SOT]; video: after [CLS]).

ViT-B/32 with n = 8: 12*8*512 + 12*8*768 = 122,880 trainable parameters.
Ablations as options: ``n_video=0`` (text-only prompts), ``n_text=0`` (video-only), ``depth``
(prompted layers counted from the input), ``n_text``/``n_video`` (prompt length).
"""
from __future__ import annotations

from dataclasses import dataclass

from vop.methods.base import VideoTextModel
from vop.methods.blocks import FrameTokens, FrameVideoPrompts, SharedFrameTokens, TextPrompts
from vop.methods.registry import register


@dataclass
class VoPOptions:
    n_text: int = 8
    n_video: int = 8
    depth: int | None = None  # None: every layer (the paper's best)


@register("vop")
class VoP(VideoTextModel):
    Options = VoPOptions

    def build(self) -> None:
        cfg = self.clip.cfg
        depth = getattr(self.opts, "depth", None)
        text_depth = cfg.text.layers if depth is None else min(depth, cfg.text.layers)
        if self.opts.n_text and text_depth:
            self.text_prompts = TextPrompts(cfg.text.layers, text_depth, self.opts.n_text, cfg.text.width)
        self.build_video()

    def build_video(self) -> None:
        layers = self.clip.cfg.vision.layers
        depth = self.opts.depth
        depth = layers if depth is None else min(depth, layers)
        if self.opts.n_video and depth:
            self.video_prompts = FrameVideoPrompts(self.frame_tokens(depth), layers)

    def frame_tokens(self, depth: int) -> FrameTokens:
        """The frame-level prompt source for the first ``depth`` image layers."""
        return SharedFrameTokens(depth, self.opts.n_video, self.clip.cfg.vision.width)
