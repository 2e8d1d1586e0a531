"""VoP^C: context-specific video prompts.

At each layer the F [CLS] tokens of a video (as they enter the layer) go through a 1-layer BiLSTM
(hidden d_v per direction) and a linear layer (2 d_v -> n_context * d_v) that generates
``n_context`` tokens per frame; the slot is [n_video - n_context shared tokens, generated tokens].
The BiLSTM and linear layer are shared across layers. ViT-B/32: 14,257,152 trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from vop.errors import ConfigError
from vop.methods.blocks import ContextFrameTokens, ContextModule, FrameTokens
from vop.methods.registry import register
from vop.methods.vop import VoP, VoPOptions


@dataclass
class VoPCOptions(VoPOptions):
    n_context: int = 4
    context_hidden: int | None = None  # None: d_v, as in the paper


@register("vop-c")
class VoPC(VoP):
    Options = VoPCOptions

    def frame_tokens(self, depth: int) -> FrameTokens:
        o, width = self.opts, self.clip.cfg.vision.width
        if not 0 < o.n_context <= o.n_video:
            raise ConfigError(f"model.options.n_context={o.n_context} of {self.name} must be in 1..{o.n_video} "
                              f"(the generated part of the n_video={o.n_video} video prompts)")
        return ContextFrameTokens(depth, o.n_video - o.n_context, ContextModule(width, o.n_context, o.context_hidden), width)
