"""Transformer building blocks with OpenAI/open_clip state-dict names and fused attention."""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """The sigmoid GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r} (quick_gelu or gelu)")


class Attention(nn.Module):
    """Multi-head self-attention, batch-first, with nn.MultiheadAttention's parameter names.

    Uses ``scaled_dot_product_attention`` so the fastest available kernel (flash, memory-efficient,
    or the fused CPU one) runs.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, t, width) -> queries, keys, values, each (n, heads, t, width / heads): the fused input
        projection, for a method that attends over its own choice of keys (DGL's global-local attention)."""
        n, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """(n, heads, t, width / heads) attention outputs -> (n, t, width): heads merged, output projection."""
        n, h, t, hd = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, t, h * hd))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.project_out(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_act(act)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


#: A branch on a block: ``branch(site, inp, out)`` with ``site`` "attn" or "mlp", ``inp`` the sublayer's
#: normalised input (ln_1(x) / ln_2(x)) and ``out`` its output; returns a tensor added to the residual
#: stream next to ``out`` (or None). Parallel adapters read ``inp``, sequential adapters read ``out``.
Site = Literal["attn", "mlp"]
Branch = Callable[[Site, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)).

    ``branch`` (see :data:`Branch`) adds a term next to each sublayer's output without re-implementing
    the block: x + attn(h) + branch("attn", h, attn(h)), then the same for the MLP.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(round(width * mlp_ratio)), act)

    def forward(self, x: torch.Tensor, causal: bool = False, branch: Branch | None = None) -> torch.Tensor:
        if branch is None:
            x = x + self.attn(self.ln_1(x), causal=causal)
            return x + self.mlp(self.ln_2(x))
        h = self.ln_1(x)
        a = self.attn(h, causal=causal)
        extra = branch("attn", h, a)
        x = x + a if extra is None else x + a + extra
        h = self.ln_2(x)
        m = self.mlp(h)
        extra = branch("mlp", h, m)
        return x + m if extra is None else x + m + extra


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, causal=causal)
        return x
