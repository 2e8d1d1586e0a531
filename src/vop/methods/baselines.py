"""Baselines of the paper's Table 1, all on the same frozen-CLIP + mean-pooling pipeline."""
from __future__ import annotations

from dataclasses import dataclass

from vop.methods.base import VideoTextModel
from vop.methods.registry import register


@register("zeroshot")
class ZeroShot(VideoTextModel):
    """CLIP as it is, frames mean-pooled. Nothing is trained."""


@register("full")
class Full(VideoTextModel):
    """Full fine-tuning (CLIP4Clip meanP): every CLIP weight, logit scale included."""

    def build(self) -> None:
        self.clip.requires_grad_(True)


@register("bias")
class Bias(VideoTextModel):
    """BitFit: every bias of both towers (attention, MLP and LayerNorm biases)."""

    def build(self) -> None:
        for name, p in self.clip.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)


@register("proj")
class Proj(VideoTextModel):
    """Only the final projections of both encoders (visual.proj, text_projection)."""

    def build(self) -> None:
        self.clip.visual.proj.requires_grad_(True)
        self.clip.text_projection.requires_grad_(True)


@dataclass
class PartialOptions:
    vision_blocks: int = 1
    text_blocks: int = 0


@register("partial")
class Partial(VideoTextModel):
    """The top of the encoders: the last ``vision_blocks`` image blocks, the last ``text_blocks`` text
    blocks, and the final LayerNorms and projections of both towers.

    The default (last image block + heads) is 7,745,792 parameters on ViT-B/32, the paper's 7.7M;
    training the last text block too would be 10.9M.
    """

    Options = PartialOptions

    def build(self) -> None:
        c, o = self.clip, self.opts
        for blk in list(c.visual.transformer.resblocks)[len(c.visual.transformer.resblocks) - o.vision_blocks:]:
            blk.requires_grad_(True)
        for blk in list(c.transformer.resblocks)[len(c.transformer.resblocks) - o.text_blocks:] if o.text_blocks else []:
            blk.requires_grad_(True)
        for m in (c.visual.ln_post, c.ln_final):
            m.requires_grad_(True)
        c.visual.proj.requires_grad_(True)
        c.text_projection.requires_grad_(True)
