"""Bottleneck adapters (hidden 64) in parallel with every attention or every MLP block of both towers.

Parallel form: x + attn(ln_1 x) + adapter(ln_1 x) (attention adapters) or
x + mlp(ln_2 x) + adapter(ln_2 x) (MLP adapters). 1,982,976 parameters on ViT-B/32.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vop.methods.base import VideoTextModel
from vop.methods.blocks import Adapter
from vop.methods.registry import register


@dataclass
class AdapterOptions:
    hidden: int = 64


class _Adapters(VideoTextModel):
    Options = AdapterOptions
    where: str = "attn"

    def build(self) -> None:
        c, h = self.clip.cfg, self.opts.hidden
        self.text_adapters = nn.ModuleList(Adapter(c.text.width, h) for _ in range(c.text.layers))
        self.visual_adapters = nn.ModuleList(Adapter(c.vision.width, h) for _ in range(c.vision.layers))

    def block(self, tower, i, blk, x, causal):
        adapter = (self.text_adapters if tower == "text" else self.visual_adapters)[i]
        h = blk.ln_1(x)
        x = x + blk.attn(h, causal=causal) + (adapter(h) if self.where == "attn" else 0)
        h = blk.ln_2(x)
        return x + blk.mlp(h) + (adapter(h) if self.where == "ffn" else 0)


@register("adapter-attn")
class AttnAdapters(_Adapters):
    where = "attn"


@register("adapter-ffn")
class FFNAdapters(_Adapters):
    where = "ffn"
