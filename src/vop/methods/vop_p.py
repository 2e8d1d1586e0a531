"""VoP^P: position-specific video prompts.

Of the n video tokens per layer, ``n_position`` (4 of 8) are specific to the frame's position j in its
video (frame j of every video shares them); the rest stay shared by all frames. Order in the slot:
[shared..., position...]. ViT-B/32, 12 frames: 12*8*512 + 12*(4 + 4*12)*768 = 528,384.
"""
from __future__ import annotations

from dataclasses import dataclass

from vop.errors import ConfigError
from vop.methods.blocks import FrameTokens, PositionFrameTokens
from vop.methods.registry import register
from vop.methods.vop import VoP, VoPOptions


@dataclass
class VoPPOptions(VoPOptions):
    n_position: int = 4


@register("vop-p")
class VoPP(VoP):
    Options = VoPPOptions

    def frame_tokens(self, depth: int) -> FrameTokens:
        o = self.opts
        if not 0 <= o.n_position <= o.n_video:
            raise ConfigError(f"model.options.n_position={o.n_position} of {self.name} must be in 0..{o.n_video} "
                              f"(the position-specific part of the n_video={o.n_video} video prompts)")
        return PositionFrameTokens(depth, o.n_video - o.n_position, o.n_position, self.frames, self.clip.cfg.vision.width)
