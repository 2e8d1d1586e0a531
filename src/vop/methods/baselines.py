"""Baselines of the paper's Table 1, all on the same frozen-CLIP + mean-pooling pipeline."""
from __future__ import annotations

from dataclasses import dataclass

from vop import limits
from vop.methods.base import VideoTextModel
from vop.methods.registry import Expected, Rates, register


@register("zeroshot", label="Zero-shot", rates=Rates(1e-3, 0.0, "nothing is trained; the run only evaluates"),
          expected=Expected(b32=0))
class ZeroShot(VideoTextModel):
    """CLIP as it is, frames mean-pooled. Nothing is trained."""


@register("full", label="Full", backbone="all", demo_rates=Rates(1e-4, 1e-5),
          rates=Rates(1e-4, 1e-6, "CLIP weights at 1e-6 as X-Pool/CLIP4Clip-style full fine-tuning (CLIP4Clip: 1e-7 at batch 128)"),
          expected=Expected(b32=151_277_313))
class Full(VideoTextModel):
    """Full fine-tuning (CLIP4Clip meanP): every CLIP weight, logit scale included."""

    def trains_clip(self):
        return self.clip.parameters()


@dataclass
class BiasOptions:
    attention_qkv: bool = False  # also the fused q/k/v biases (in_proj_bias): BitFit in full


@register("bias", label="Bias", backbone="part", demo_rates=Rates(1e-3, 1e-3),
          rates=Rates(1e-3, 1e-4, "BitFit-style: biases tolerate ~100x the full-tuning rate"),
          expected=Expected(b32=124_928, option_sets=(({"attention_qkv": True}, 171_008),)))
class Bias(VideoTextModel):
    """BitFit as the paper counts it (0.1M): the bias vector of every ``nn.Linear``/``nn.LayerNorm``
    module of both towers, i.e. attention output projections, both MLP layers and every LayerNorm
    (ln_1, ln_2, ln_pre, ln_post, ln_final): 124,928 on ViT-B/32.

    The fused query/key/value bias of each attention block (``attn.in_proj_bias``, 46,080 on
    ViT-B/32) is frozen by default: with it the count is 171,008 (0.17M), which does not match the
    paper's 0.1M. ``attention_qkv=True`` trains it too (every bias of CLIP, the original BitFit).
    """

    Options = BiasOptions

    def trains_clip(self):
        suffixes = (".bias", ".in_proj_bias") if self.opts.attention_qkv else (".bias",)
        return [p for name, p in self.clip.named_parameters() if name.endswith(suffixes)]


@register("proj", label="Proj", backbone="part", demo_rates=Rates(1e-3, 1e-3),
          rates=Rates(1e-3, 1e-4, "two projection matrices: linear-probe-like rate"), expected=Expected(b32=655_360))
class Proj(VideoTextModel):
    """Only the final projections of both encoders (visual.proj, text_projection)."""

    def trains_clip(self):
        return [self.clip.projection(tower) for tower in ("visual", "text")]


@dataclass
class PartialOptions:
    vision_blocks: int = 1
    text_blocks: int = 0


@register("partial", label="Partial", backbone="part", demo_rates=Rates(1e-3, 1e-4),
          rates=Rates(1e-3, 1e-5, "top block + heads: between full tuning and probing"),
          expected=Expected(b32=7_745_792, option_sets=(({"text_blocks": 1}, 10_898_176),)))
class Partial(VideoTextModel):
    """The top of the encoders: the last ``vision_blocks`` image blocks, the last ``text_blocks`` text
    blocks, and the final LayerNorms and projections of both towers.

    The default (last image block + heads) is 7,745,792 parameters on ViT-B/32, the paper's 7.7M;
    training the last text block too would be 10.9M.
    """

    Options = PartialOptions

    @classmethod
    def check_options(cls, opts, cfg, frames) -> None:
        # more blocks than a tower has trains the whole tower (as a depth beyond the layers, everywhere)
        for name in ("vision_blocks", "text_blocks"):
            limits.check_int(getattr(opts, name), f"model.options.{name} of partial", 0, limits.MAX_LAYERS)

    def trains_clip(self):
        for tower, n in (("visual", self.opts.vision_blocks), ("text", self.opts.text_blocks)):
            blocks = self.clip.blocks(tower)
            for blk in list(blocks)[len(blocks) - n:] if n else []:
                yield from blk.parameters()
            yield from self.clip.head_parameters(tower)
