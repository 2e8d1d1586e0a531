"""Bottleneck adapters (hidden 64) in parallel with every attention or every MLP block of both towers.

Parallel form: x + attn(ln_1 x) + adapter(ln_1 x) (attention adapters) or
x + mlp(ln_2 x) + adapter(ln_2 x) (MLP adapters). 1,982,976 parameters on ViT-B/32.
The adapters ride on the blocks' ``branch`` hook (vop.backbone.layers.Branch).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vop import limits
from vop.methods.base import VideoTextModel
from vop.methods.blocks import Adapter
from vop.methods.registry import Expected, Rates, register

_RATES = Rates(1e-3, 1e-6, "new bottleneck adapters (zero-initialised up-projection)")


@dataclass
class AdapterOptions:
    hidden: int = 64


class _Adapters(VideoTextModel):
    Options = AdapterOptions
    site: str = "attn"  # the sublayer whose normalised input the adapters read, in parallel

    @classmethod
    def check_options(cls, opts, cfg, frames) -> None:
        limits.check_int(opts.hidden, f"model.options.hidden of {cls.name}", 1, limits.MAX_WIDTH)

    def build(self) -> None:
        h = self.opts.hidden
        for tower in ("text", "visual"):
            c = self.clip.tower_config(tower)
            setattr(self, f"{tower}_adapters", nn.ModuleList(Adapter(c.width, h) for _ in range(c.layers)))

    def branch(self, tower, i):
        adapter = (self.text_adapters if tower == "text" else self.visual_adapters)[i]
        site = self.site
        return lambda where, inp, out: adapter(inp) if where == site else None


@register("adapter-attn", label="Adapter (attn)", rates=_RATES, expected=Expected(b32=1_982_976))
class AttnAdapters(_Adapters):
    site = "attn"


@register("adapter-ffn", label="Adapter (FFN)", rates=_RATES, expected=Expected(b32=1_982_976))
class FFNAdapters(_Adapters):
    site = "mlp"
