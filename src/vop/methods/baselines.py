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


@dataclass
class BiasOptions:
    attention_qkv: bool = False  # also the fused q/k/v biases (in_proj_bias): BitFit in full


@register("bias")
class Bias(VideoTextModel):
    """BitFit as the paper counts it (0.1M): the bias vector of every ``nn.Linear``/``nn.LayerNorm``
    module of both towers, i.e. attention output projections, both MLP layers and every LayerNorm
    (ln_1, ln_2, ln_pre, ln_post, ln_final): 124,928 on ViT-B/32.

    The fused query/key/value bias of each attention block (``attn.in_proj_bias``, 46,080 on
    ViT-B/32) is frozen by default: with it the count is 171,008 (0.17M), which does not match the
    paper's 0.1M. ``attention_qkv=True`` trains it too (every bias of CLIP, the original BitFit).
    """

    Options = BiasOptions

    def build(self) -> None:
        suffixes = (".bias", ".in_proj_bias") if self.opts.attention_qkv else (".bias",)
        for name, p in self.clip.named_parameters():
            if name.endswith(suffixes):
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
