"""Basic VoP: deep prompts in every layer of both encoders (text: after [SOT]; video: after [CLS]).

ViT-B/32 with n = 8: 12*8*512 + 12*8*768 = 122,880 trainable parameters.
Ablations as options: ``n_video=0`` (text-only prompts), ``n_text=0`` (video-only), ``depth``
(prompted layers counted from the input), ``n_text``/``n_video`` (prompt length).

``semantics="modelscope"`` runs the same prompts the way the authors' released code does (their
ModelScope models load with ``vop.load_checkpoint(FOLDER)``): the first layer's video prompts go
through ``ln_pre``; the last ``n_text_suffix`` text prompts sit before the last position of the
sequence, which is zero-padded to CLIP's context; prompts take text positions; the text is read
``n_text`` positions after [EOT]. See docs/methods.md, "Loading the authors' models".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vop.errors import ConfigError
from vop.methods.base import VideoTextModel
from vop.methods.blocks import FrameTokens, FrameVideoPrompts, SharedFrameTokens, SplitTextPrompts, TextPrompts
from vop.methods.registry import register

SEMANTICS = ("vop", "modelscope")


@dataclass
class VoPOptions:
    n_text: int = 8
    n_video: int = 8
    depth: int | None = None  # None: every layer (the paper's best)


@dataclass
class BasicVoPOptions(VoPOptions):
    semantics: str = "vop"  # "modelscope": as the authors' released code (see the module docstring)
    n_text_suffix: int = 0  # modelscope: of the n_text text prompts, how many sit before the last position


@register("vop")
class VoP(VideoTextModel):
    Options = BasicVoPOptions

    @property
    def modelscope(self) -> bool:
        return getattr(self.opts, "semantics", "vop") == "modelscope"

    def build(self) -> None:
        cfg = self.clip.cfg
        depth = getattr(self.opts, "depth", None)
        semantics = getattr(self.opts, "semantics", "vop")
        if semantics not in SEMANTICS:
            raise ConfigError(f"option semantics must be one of {', '.join(SEMANTICS)}, got {semantics!r}")
        if semantics == "modelscope":
            self.build_modelscope()
            return
        if getattr(self.opts, "n_text_suffix", 0):
            raise ConfigError("option n_text_suffix needs semantics='modelscope'")
        text_depth = cfg.text.layers if depth is None else min(depth, cfg.text.layers)
        if self.opts.n_text and text_depth:
            self.text_prompts = TextPrompts(cfg.text.layers, text_depth, self.opts.n_text, cfg.text.width)
        self.build_video()

    def build_modelscope(self) -> None:
        """Prompts in every layer of both towers, laid out as in the authors' code."""
        o, cfg = self.opts, self.clip.cfg
        if o.depth is not None:
            raise ConfigError("semantics='modelscope' prompts every layer (as the authors' code): leave depth unset")
        if o.n_text_suffix > o.n_text:
            raise ConfigError(f"n_text_suffix={o.n_text_suffix} exceeds n_text={o.n_text}")
        if o.n_text:
            self.text_prompts = SplitTextPrompts(cfg.text.layers, o.n_text - o.n_text_suffix, o.n_text_suffix, cfg.text.width)
        if o.n_video:
            v = cfg.vision
            tokens = SharedFrameTokens(v.layers, o.n_video, v.width, first_norm=self.clip.visual.ln_pre)
            self.video_prompts = FrameVideoPrompts(tokens, v.layers)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if not (self.modelscope and self.text_prompts is not None):
            return super().encode_text(tokens)
        self.check_text_length(tokens)
        # the authors' sequences always fill CLIP's context: the suffix slot sits before its last position
        tokens = F.pad(tokens, (0, self.max_text_tokens - tokens.shape[1]))
        x = self.text_prompts(self.clip.token_embedding(tokens), self._runner("text"), self.clip.positional_embedding)
        x = self.clip.ln_final(x)
        read = tokens.argmax(dim=-1) + self.text_prompt_tokens  # n_text positions after [EOT], as their code reads
        return x[torch.arange(x.shape[0], device=x.device), read] @ self.clip.text_projection

    def build_video(self) -> None:
        layers = self.clip.cfg.vision.layers
        depth = self.opts.depth
        depth = layers if depth is None else min(depth, layers)
        if self.opts.n_video and depth:
            self.video_prompts = FrameVideoPrompts(self.frame_tokens(depth), layers)

    def frame_tokens(self, depth: int) -> FrameTokens:
        """The frame-level prompt source for the first ``depth`` image layers."""
        return SharedFrameTokens(depth, self.opts.n_video, self.clip.cfg.vision.width)
