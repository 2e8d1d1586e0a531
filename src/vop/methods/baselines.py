"""Baselines of the paper's Table 1, all on the same frozen-CLIP + mean-pooling pipeline."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vop import limits
from vop.backbone.layers import Attention
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
        """The bias of every Linear and LayerNorm module (attention pool included, PE-Core, SigLIP) and of the
        projections (PE-Core, EVA02; SigLIP's text projection); with ``attention_qkv`` the q/k/v biases too (``in_proj_bias``; EVA02's ``q_bias`` and
        ``v_bias``, its key has none). Not the patch embedding's (a convolution; EVA02). In CLIP's order."""
        picked = {id(m.bias) for m in self.clip.modules()
                  if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None}
        picked |= {id(p) for t in ("visual", "text") for p in self.clip.projection_parameters(t)[1:]}
        if self.opts.attention_qkv:
            picked |= {id(p) for m in self.clip.modules() if isinstance(m, Attention)
                       for n, p in m.named_parameters(recurse=False) if n in ("in_proj_bias", "q_bias", "v_bias")}
        return [p for p in self.clip.parameters() if id(p) in picked]


@register("proj", label="Proj", backbone="part", demo_rates=Rates(1e-3, 1e-3),
          rates=Rates(1e-3, 1e-4, "two projection matrices: linear-probe-like rate"), expected=Expected(b32=655_360))
class Proj(VideoTextModel):
    """Only the final projections of both encoders (visual.proj, text_projection; and their biases where the
    backbone has them: PE-Core's and EVA02's image projection, SigLIP's text projection). An image tower without a
    projection (SigLIP) is refused: training the text side alone would be another baseline (not in v1)."""

    @classmethod
    def unsupported_backbone(cls, cfg):
        if not cfg.vision.proj:
            return ("it trains the projections of both towers, and this image tower has none (its attention pool's "
                    f"output is the embedding: {cfg.family}); a text-side-only variant is not defined in v1")
        return super().unsupported_backbone(cfg)

    def trains_clip(self):
        return [p for tower in ("visual", "text") for p in self.clip.projection_parameters(tower)]


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
