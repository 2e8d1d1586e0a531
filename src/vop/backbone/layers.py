"""Transformer building blocks with OpenAI/open_clip state-dict names and fused attention.

One block serves every family (vop.backbone.config.VisionConfig says which parts a tower has): pre-LN,
fused q/k/v with a bias on q, k and v (CLIP, PE-Core) or on q and v only (EVA02: ``q_bias``/``v_bias``, the
key bias is zero), an optional LayerNorm over the heads' outputs before the output projection (EVA02's
sub-LN, ``attn.norm``), a GELU-family MLP (``c_fc`` -> act -> ``c_proj``) or a SwiGLU (``c_fc`` holds the
gate rows then the value rows, SiLU(gate) * value, ``mlp.norm``, ``c_proj``), and 2-D rotary position
embeddings on queries and keys (:class:`Rope`) given per call as full-length tables.
"""
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
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r} (quick_gelu, gelu or gelu_tanh)")


#: (cos, sin), each (T, head_dim): the rotation of every token of a sequence (identity rows: cos 1, sin 0)
RopeTable = tuple[torch.Tensor, torch.Tensor]


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (a, b) -> (-b, a) along the last dimension (timm's ``rot``)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def apply_rope(x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Rotate ``x`` (..., T, head_dim) by ``rope``: x cos + rot(x) sin, in x's dtype. Identity rows return x
    bit for bit (x * 1 + rot(x) * 0)."""
    cos, sin = rope
    return (x * cos + rotate_pairs(x) * sin).to(x.dtype)


def rope_angles(grid: int, head_dim: int, theta: float, offset: float, indexing: str, ref_grid: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (grid * grid, head_dim): the 2-D rotary table of a square patch grid, patch (row r,
    column c) at row r * grid + c, computed as timm's ``build_rotary_pos_embed`` does (float32, on the CPU):
    head_dim / 4 frequencies 1 / theta ** (k / (head_dim / 4)) per axis; coordinates (i + offset), rescaled
    by ref_grid / grid when ref_grid is given; the angle vector [axis0 * freqs, axis1 * freqs] with axis0 = x
    (the column) for ``indexing`` "xy", y (the row) for "ij"; each angle covers one interleaved pair."""
    nb = head_dim // 4
    exp = torch.arange(0, nb, 1, dtype=torch.int64, device="cpu").to(torch.float32) / nb
    bands = 1.0 / (float(theta) ** exp)
    t = torch.arange(grid, dtype=torch.int64, device="cpu").to(torch.float32) + offset
    if ref_grid is not None:
        t = t / grid * ref_grid
    coords = torch.stack(torch.meshgrid([t, t], indexing=indexing), dim=-1).to(torch.float32)  # (g, g, 2)
    pos = coords.unsqueeze(-1) * bands  # (g, g, 2, nb)
    sin = pos.sin().flatten(-2).flatten(0, -2).repeat_interleave(2, -1)
    cos = pos.cos().flatten(-2).flatten(0, -2).repeat_interleave(2, -1)
    return cos, sin


class Rope(nn.Module):
    """2-D RoPE of an image tower: one table row per *patch*, in patch order (never per sequence index).

    :meth:`table` gives the rotation of a whole sequence whose last ``tiles * M`` tokens are the patches of
    ``tiles`` frames (each tile the per-frame table): every token before them ([CLS], prompt tokens, global
    tokens) gets the identity rotation, as [CLS] does in PE-Core and EVA02. So whoever inserts tokens before
    the patches inserts identity rows with them, by construction. Tables are recomputed from the record
    (non-persistent buffers: not in any state dict)."""

    def __init__(self, grid: int, head_dim: int, theta: float, offset: float, indexing: str, ref_grid: int | None):
        super().__init__()
        self.grid = grid
        with torch.device("cpu"):  # the CPU numerics of timm's tables, whatever the default device
            cos, sin = rope_angles(grid, head_dim, theta, offset, indexing, ref_grid)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._cache: dict[tuple, RopeTable] = {}

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    def table(self, tokens: int, tiles: int = 1) -> RopeTable:
        """(cos, sin), each (tokens, head_dim): identity for the first ``tokens - tiles * M``, then the patch
        table ``tiles`` times."""
        m = tiles * self.patches
        if tokens < m:
            raise ValueError(f"a sequence of {tokens} tokens cannot hold the {m} patch tokens of {tiles} frame(s)")
        key = (tokens, tiles, self.cos.device, self.cos.dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cos, sin = self.cos, self.sin
        if tiles > 1:
            cos, sin = cos.repeat(tiles, 1), sin.repeat(tiles, 1)
        n = tokens - m
        if n:
            cos = torch.cat([cos.new_ones(n, cos.shape[1]), cos])
            sin = torch.cat([sin.new_zeros(n, sin.shape[1]), sin])
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = (cos, sin)
        return cos, sin

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)


class Attention(nn.Module):
    """Multi-head self-attention, batch-first, with nn.MultiheadAttention's parameter names.

    Uses ``scaled_dot_product_attention`` so the fastest available kernel (flash, memory-efficient,
    or the fused CPU one) runs. ``qkv_bias``: "qkv" (``in_proj_bias``) or "qv" (``q_bias``, ``v_bias``: no key
    bias, EVA02); ``norm``: a LayerNorm (``eps``) over the merged heads before ``out_proj`` (EVA02's sub-LN).
    """

    def __init__(self, width: int, heads: int, *, qkv_bias: str = "qkv", norm: bool = False, eps: float = 1e-5):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        if qkv_bias == "qkv":
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        elif qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
        else:
            raise ValueError(f"qkv_bias must be qkv or qv, got {qkv_bias!r}")
        self.qkv_bias = qkv_bias
        self.out_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps) if norm else None

    def bias(self) -> torch.Tensor:
        """The q/k/v bias as one vector (EVA02's key bias: zeros)."""
        if self.qkv_bias == "qkv":
            return self.in_proj_bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def qkv(self, x: torch.Tensor, rope: RopeTable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, t, width) -> queries, keys, values, each (n, heads, t, width / heads): the fused input
        projection, for a method that attends over its own choice of keys (DGL's global-local attention).
        ``rope``: the rotation of this sequence's tokens (:meth:`Rope.table`), applied to queries and keys."""
        n, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.bias())
        q, k, v = qkv.view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """(n, heads, t, width / heads) attention outputs -> (n, t, width): heads merged, sub-LN if any, output
        projection."""
        n, h, t, hd = out.shape
        out = out.transpose(1, 2).reshape(n, t, h * hd)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)

    def forward(self, x: torch.Tensor, causal: bool = False, rope: RopeTable | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        return self.project_out(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


class MLP(nn.Module):
    """``kind`` "mlp": c_fc -> act -> c_proj; "swiglu": c_fc (gate rows, then value rows) -> SiLU(gate) * value
    -> ``norm`` (LayerNorm, if ``norm``) -> c_proj (timm's SwiGLU with its fc1_g / fc1_x fused)."""

    def __init__(self, width: int, hidden: int, act: str, *, kind: str = "mlp", norm: bool = False, eps: float = 1e-5):
        super().__init__()
        if kind not in ("mlp", "swiglu"):
            raise ValueError(f"MLP kind must be mlp or swiglu, got {kind!r}")
        self.swiglu = kind == "swiglu"
        self.c_fc = nn.Linear(width, 2 * hidden if self.swiglu else hidden)
        self.gelu = nn.SiLU() if self.swiglu else make_act(act)
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else None
        self.c_proj = nn.Linear(hidden, width)

    def hidden(self, a: torch.Tensor) -> torch.Tensor:
        """``c_fc``'s output -> ``c_proj``'s input: the activation (SwiGLU: SiLU(gate) * value, then ``norm``).
        A method that changes the two linear maps (LoRA) runs ``c_proj(hidden(c_fc(x)))`` with its own maps."""
        if not self.swiglu:
            return self.gelu(a)
        gate, value = a.chunk(2, dim=-1)
        h = self.gelu(gate) * value
        return h if self.norm is None else self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.hidden(self.c_fc(x)))


#: A branch on a block: ``branch(site, inp, out)`` with ``site`` "attn" or "mlp", ``inp`` the sublayer's
#: normalised input (ln_1(x) / ln_2(x)) and ``out`` its output; returns a tensor added to the residual
#: stream next to ``out`` (or None). Parallel adapters read ``inp``, sequential adapters read ``out``.
Site = Literal["attn", "mlp"]
Branch = Callable[[Site, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)).

    ``branch`` (see :data:`Branch`) adds a term next to each sublayer's output without re-implementing
    the block: x + attn(h) + branch("attn", h, attn(h)), then the same for the MLP. ``rope``: the rotation of
    this sequence's tokens (:meth:`Rope.table`; None: no rotary embedding). The keyword options are the
    tower's (see the module docstring); their defaults are OpenAI's CLIP block.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, *, eps: float = 1e-5,
                 qkv_bias: str = "qkv", attn_norm: bool = False, mlp: str = "mlp", mlp_norm: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias, norm=attn_norm, eps=eps)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(round(width * mlp_ratio)), act, kind=mlp, norm=mlp_norm, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False, branch: Branch | None = None,
                rope: RopeTable | None = None) -> torch.Tensor:
        if branch is None:
            x = x + self.attn(self.ln_1(x), causal=causal, rope=rope)
            return x + self.mlp(self.ln_2(x))
        h = self.ln_1(x)
        a = self.attn(h, causal=causal, rope=rope)
        extra = branch("attn", h, a)
        x = x + a if extra is None else x + a + extra
        h = self.ln_2(x)
        m = self.mlp(h)
        extra = branch("mlp", h, m)
        return x + m if extra is None else x + m + extra


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str, **block_options):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act, **block_options)
                                       for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, rope: RopeTable | None = None) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, causal=causal, rope=rope)
        return x


class AttentionPool(nn.Module):
    """Attention pooling with one learned latent query (MAP; timm's AttentionPoolLatent, PE's AttentionPooling),
    with PE's names: q = latent (``probe``) projected, keys/values = the tokens projected (``attn.in_proj_*``:
    q rows, then k, then v), ``heads`` heads, o = ``attn.out_proj``(attention), y = o + MLP(``layernorm``(o)).
    (N, T, width) -> (N, width)."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = Attention(width, heads)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        a = self.attn
        h = a.heads
        w, b = a.in_proj_weight, a.in_proj_bias
        q = F.linear(self.probe.to(x.dtype), w[:d], b[:d]).expand(n, 1, d).reshape(n, 1, h, d // h).transpose(1, 2)
        k, v = F.linear(x, w[d:], b[d:]).view(n, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = a.project_out(F.scaled_dot_product_attention(q, k, v))  # (n, 1, d)
        o = o + self.mlp(self.layernorm(o))
        return o[:, 0]
