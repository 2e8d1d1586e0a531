"""MV-Adapter (Jin, Zhang et al., CVPR 2024): sequential adapters after the MLP of every block of both
towers; the video adapters carry a 64-d temporal transformer, the text adapters a causal one, and the
top layers' down-projections are modulated by factors shared by both towers (Cross Modality Tying).

Built from the released code (zhangbw17/MV-Adapter, HEAD 08a61f3, ``configs/msrvtt/msrvtt.py``), as
specified in the project's build spec (later-methods.md, section 2). Every block l of both towers:
m = MLP(ln_2(x)); x <- x + m + A_l(m) (the block's ``branch`` hook, site "mlp", reading ``out``).

Video adapter A^v_l on m (B*F, 1+M, w), frame-major (index b*F + f), k = ``mid``:

- z = QuickGELU(m W_d^T + b_d) (k wide); c_f = z at the [CLS] of frame f, p_f = mean of z over its M patches;
- S = LN_k([g; c_1..c_F; p_1..p_F] + P_v), P_v (1 + 2F) x k; one pre-LN block (k wide, ``heads``,
  MLP k -> 4k -> k, QuickGELU, bidirectional); QuickGELU; g', c'_f, p'_f read back;
- alpha_f = 1 + W_b ReLU(W_a [c'_f + p'_f; W_g g' + b_g] + b_a) (W_a 16 x 2k, W_b k x 16 zero-initialised);
- output ``scale`` * (W_u (alpha_f * c'_f) + b_u) at frame f's [CLS], ``scale`` * (W_u z + b_u) at every
  patch (patches get no temporal information).

Text adapter A^t_l on m (B, T, w): z = LN_k(m W_d^T + b_d + P_t[:T]) (no activation before), one causal
pre-LN block, QuickGELU, ``scale`` * (W_u z + b_u). P_t has ``text_len`` rows: captions are at most
``text_len`` tokens ([SOT] + words + [EOT]; ``max_text_tokens``). Shorter inputs use the first T rows:
the adapter is causal and position-wise elsewhere, so this equals padding to ``text_len`` at every
position < T (tests/test_methods_mv_adapter.py checks it).

CMT on ``cmt_layers`` (default: the last two layers of each tower, 10 and 11 on ViT-B): one factor
phi_l (``factor_dim``, zero-initialised) per tied layer, the same tensor for both towers; each adapter
there owns h_l = Linear(factor_dim -> k) and scales the k output rows of its W_d by c = h_l(phi_l)
(``cmt_mode="down_out"``; ``"down_in"``: h_l maps to w and scales W_d's w input columns). The bias b_d
is not scaled. An entry of ``cmt_layers`` counts from the input (0..L-1) or, negative, from the top of
each tower (-1: its last layer), so the default means the same thing on towers of any depth.

W_u and b_u are zero-initialised: every adapter returns exactly 0 and the model starts as frozen CLIP.

Counts on ViT-B/32 (and ViT-B/16: nothing depends on the patch count), F = 12, text_len = 32:
video 158,160 per layer, text 118,272 per layer, CMT 8,512: 3,325,696. ``train_clip_bias=True`` (the
released config trains every CLIP bias, q/k/v included) adds 171,008: 3,496,704.

The video adapters' P_v has one row per frame and per pooled frame: the model takes exactly the
``frames`` it was built with (``frame_bound``).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from vop.backbone.layers import QuickGELU, ResidualAttentionBlock
from vop import limits
from vop.errors import ConfigError
from vop.methods.base import VideoTextModel, pool_frames
from vop.methods.registry import Expected, Rates, register

#: hidden width of the calibration MLP (``mid_dim=16`` in the released TaModuleV1)
CALIBRATION_HIDDEN = 16
CMT_MODES = ("down_out", "down_in")


@dataclass
class MVAdapterOptions:
    mid: int = 64  # bottleneck width k (the temporal/text transformer's width)
    heads: int = 2  # heads of the k-wide transformer blocks
    scale: float = 0.1  # fixed scale of every adapter's output
    cmt_layers: list[int] | None = None  # tied layers; None: the last two of each tower ([-2, -1])
    factor_dim: int = 32  # size of each shared factor phi_l
    cmt_mode: str = "down_out"  # "down_out" (MSR-VTT config) or "down_in" (MSVD, LSMDC configs)
    train_clip_bias: bool = False  # also train every CLIP bias (q/k/v included), as the released config
    frame_norm: bool = True  # video = mean of L2-normalised frame embeddings (CLIP4Clip meanP); False: plain mean
    text_len: int = 32  # rows of P_t = the caption budget in tokens, [SOT] and [EOT] included

    def __post_init__(self) -> None:
        if isinstance(self.cmt_layers, tuple):  # one spelling, so that saved options compare equal
            self.cmt_layers = list(self.cmt_layers)


def _block(mid: int, heads: int, init_width: int) -> ResidualAttentionBlock:
    """The k-wide pre-LN transformer block; initialised as the released code (stds from the *tower*
    width, as in CLIP's own blocks: in-proj N(0, w^-1/2), out-proj, c_fc and c_proj N(0, (2w)^-1/2);
    attention biases 0 as nn.MultiheadAttention; the MLP biases keep nn.Linear's default)."""
    blk = ResidualAttentionBlock(mid, heads, 4.0, "quick_gelu")
    std = (2 * init_width) ** -0.5
    nn.init.normal_(blk.attn.in_proj_weight, std=init_width ** -0.5)
    nn.init.normal_(blk.attn.out_proj.weight, std=std)
    nn.init.zeros_(blk.attn.out_proj.bias)
    nn.init.normal_(blk.mlp.c_fc.weight, std=std)
    nn.init.normal_(blk.mlp.c_proj.weight, std=std)
    return blk


class _MVBase(nn.Module):
    """What both adapters share: W_d (optionally modulated by a shared factor), LN_k, the k-wide block,
    W_u (zero-initialised), the fixed output scale."""

    def __init__(self, width: int, mid: int, heads: int, scale: float, factor_dim: int | None, cmt_mode: str):
        super().__init__()
        self.width, self.mid, self.scale, self.cmt_mode = width, mid, scale, cmt_mode
        self.down = nn.Linear(width, mid)
        self.up = nn.Linear(mid, width)
        self.ln = nn.LayerNorm(mid)
        self.block = _block(mid, heads, width)
        # h_l: only on the tied layers; c = h_l(phi_l) scales W_d's output rows (down_out) or input columns
        self.factor_map = (nn.Linear(factor_dim, mid if cmt_mode == "down_out" else width)
                           if factor_dim is not None else None)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def down_weight(self, factor: torch.Tensor | None) -> torch.Tensor:
        w = self.down.weight
        if self.factor_map is None:
            return w
        if factor is None:
            raise ValueError("this adapter is on a tied (CMT) layer: it needs the layer's shared factor")
        c = self.factor_map(factor)
        return c[:, None] * w if self.cmt_mode == "down_out" else w * c[None, :]


class VideoAdapter(_MVBase):
    """A^v_l: (B*F, 1+M, w) MLP outputs -> the adapter's term, for videos of exactly ``frames`` frames."""

    def no_weight_decay(self) -> set[str]:
        return {"positions", "video_token"}  # tokens and embeddings added to tokens

    def frame_bound(self) -> str:
        return "temporal position embedding P_v (1 + 2F rows)"

    def __init__(self, width: int, frames: int, mid: int, heads: int, scale: float, factor_dim: int | None,
                 cmt_mode: str):
        super().__init__(width, mid, heads, scale, factor_dim, cmt_mode)
        self.frames = frames
        self.act = QuickGELU()
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)  # PyTorch's default, as the released code
        self.positions = nn.Parameter(torch.randn(1 + 2 * frames, mid) * 0.01)  # P_v
        self.video_token = nn.Parameter(torch.randn(mid) * mid ** -0.5)  # g
        self.calibrate_g = nn.Linear(mid, mid)  # W_g, b_g
        self.calibrate_a = nn.Linear(2 * mid, CALIBRATION_HIDDEN)  # W_a, b_a
        self.calibrate_b = nn.Linear(CALIBRATION_HIDDEN, mid, bias=False)  # W_b: alpha = 1 at init
        nn.init.zeros_(self.calibrate_b.weight)

    def forward(self, m: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        N, T, w = m.shape
        Fr = self.frames
        if N % Fr:
            raise ValueError(f"MV-Adapter's video adapters were built for {Fr} frames per video; "
                             f"got {N} frames in the batch")
        B = N // Fr
        z = self.act(F.linear(m, self.down_weight(factor).to(m.dtype), self.down.bias.to(m.dtype)))
        z = z.view(B, Fr, T, self.mid)
        g = self.video_token.to(z.dtype).expand(B, 1, self.mid)
        s = torch.cat([g, z[:, :, 0], z[:, :, 1:].mean(dim=2)], dim=1) + self.positions.to(z.dtype)
        s = self.act(self.block(self.ln(s)))  # bidirectional: every frame sees every frame
        g2, c2, p2 = s[:, 0], s[:, 1:1 + Fr], s[:, 1 + Fr:]
        ctx = self.calibrate_g(g2)[:, None].expand(-1, Fr, -1)
        alpha = 1 + self.calibrate_b(torch.relu(self.calibrate_a(torch.cat([c2 + p2, ctx], dim=-1))))
        cls = self.up(alpha * c2)  # (B, F, w): the temporal output, calibrated
        patches = self.up(z[:, :, 1:])  # (B, F, M, w): no temporal information
        out = torch.cat([cls[:, :, None], patches], dim=2).view(N, T, w)
        return self.scale * out


class TextAdapter(_MVBase):
    """A^t_l: (B, T, w) MLP outputs, T <= ``text_len`` -> the adapter's term (causal)."""

    def no_weight_decay(self) -> set[str]:
        return {"positions"}

    def __init__(self, width: int, text_len: int, mid: int, heads: int, scale: float, factor_dim: int | None,
                 cmt_mode: str):
        super().__init__(width, mid, heads, scale, factor_dim, cmt_mode)
        self.text_len = text_len
        self.act = QuickGELU()
        nn.init.normal_(self.down.weight, std=(2 * width) ** -0.5)
        self.positions = nn.Parameter(torch.randn(text_len, mid) * 0.01)  # P_t

    def forward(self, m: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        T = m.shape[1]
        if T > self.text_len:
            raise ValueError(f"{T} text tokens but MV-Adapter's text positions cover {self.text_len} (text_len)")
        z = F.linear(m, self.down_weight(factor).to(m.dtype), self.down.bias.to(m.dtype))
        z = self.ln(z + self.positions[:T].to(z.dtype))
        z = self.act(self.block(z, causal=True))
        return self.scale * self.up(z)


def resolve_layers(entries: list[int], layers: int, tower: str) -> list[int]:
    """``cmt_layers`` entries as block indices of a tower of ``layers`` blocks (negative: from the top)."""
    out = []
    for e in entries:
        if isinstance(e, bool) or not isinstance(e, int) or not -layers <= e < layers:
            raise ConfigError(f"mv-adapter: cmt_layers entry {e!r} is not a layer of the {layers}-layer {tower} "
                              f"tower (give 0..{layers - 1}, or -1..-{layers} counted from the top)")
        out.append(e % layers)
    if len(set(out)) != len(out):
        raise ConfigError(f"mv-adapter: cmt_layers {entries} name a layer of the {tower} tower twice")
    return out


@register("mv-adapter", label="MV-Adapter",
          rates=Rates(5e-6, 1e-7, "MV-Adapter's released recipe (configs + optimizer/build.py): 5e-6 for the "
                                  "adapters, CMT factors and h_l; 1e-7 for CLIP's biases when train_clip_bias; the "
                                  "spec then sweeps 1e-5..5e-4"),
          # synthetic world, validation t2v R@1 (selected epoch): 1e-4 25.0, 1e-3 37.5, 3e-3 37.5 (higher rsum),
          # 1e-2 34.4 (docs/methods.md, MV-Adapter)
          demo_rates=Rates(3e-3, 1e-5, "chosen on the synthetic world's validation split"),
          # W_u is zero at initialisation: CLIP exactly, so the order of the frames is not seen yet
          expected=Expected(b32=3_325_696, token_tensors=("positions", "video_token"),
                            option_sets=(({"train_clip_bias": True}, 3_496_704),)))
class MVAdapter(VideoTextModel):
    """Multimodal Video Adapter (CVPR 2024): see the module docstring."""

    Options = MVAdapterOptions
    depth_options = ("cmt_layers",)  # layer indices: checked against a weights file's depth once it is read

    @classmethod
    def check_options(cls, o, cfg, frames) -> None:
        limits.check_int(o.mid, "model.options.mid of mv-adapter", 1, limits.MAX_WIDTH)
        limits.check_int(o.heads, "model.options.heads of mv-adapter", 1, o.mid)
        limits.check_int(o.factor_dim, "model.options.factor_dim of mv-adapter", 0, limits.MAX_WIDTH)
        if o.cmt_layers is not None:
            if len(o.cmt_layers) > limits.MAX_LAYERS:
                raise ConfigError(f"model.options.cmt_layers of mv-adapter: {len(o.cmt_layers)} entries, more than any "
                                  "tower has layers")
            for tower in ("visual", "text"):  # every entry a layer of both towers (negative: from the top)
                resolve_layers(list(o.cmt_layers), (cfg.vision if tower == "visual" else cfg.text).layers, tower)

    @classmethod
    def config_options(cls, words: int, frames: int) -> dict:
        """Captions longer than the default ``text_len`` (the paragraph datasets' 64 words) need a text
        position per token."""
        return {"text_len": words} if words > cls.Options().text_len else {}

    def build(self) -> None:
        o = self.opts
        if o.mid < 1 or o.heads < 1 or o.mid % o.heads:
            raise ConfigError(f"mv-adapter: mid={o.mid} must be a positive multiple of heads={o.heads}")
        if o.cmt_mode not in CMT_MODES:
            raise ConfigError(f"mv-adapter: cmt_mode must be one of {CMT_MODES}, got {o.cmt_mode!r}")
        context = self.clip.tower_config("text").context_length
        if not 2 <= o.text_len <= context:
            raise ConfigError(f"mv-adapter: text_len={o.text_len} must be in 2..{context} (CLIP's text context)")
        entries = [-2, -1] if o.cmt_layers is None else list(o.cmt_layers)
        if entries and o.factor_dim < 1:
            raise ConfigError("mv-adapter: factor_dim must be >= 1 when cmt_layers ties any layer")
        cv, ct = self.clip.tower_config("visual"), self.clip.tower_config("text")
        # tied layer -> index of its shared factor, per tower
        self._cmt: dict[str, dict[int, int]] = {
            "visual": {layer: k for k, layer in enumerate(resolve_layers(entries, cv.layers, "visual"))},
            "text": {layer: k for k, layer in enumerate(resolve_layers(entries, ct.layers, "text"))},
        }
        fd = lambda tower, i: o.factor_dim if i in self._cmt[tower] else None  # noqa: E731
        self.video_adapters = nn.ModuleList(
            VideoAdapter(cv.width, self.frames, o.mid, o.heads, o.scale, fd("visual", i), o.cmt_mode)
            for i in range(cv.layers))
        self.text_adapters = nn.ModuleList(
            TextAdapter(ct.width, o.text_len, o.mid, o.heads, o.scale, fd("text", i), o.cmt_mode)
            for i in range(ct.layers))
        # phi_l: one tensor per tied layer, read by both towers' adapters there
        self.cmt_factors = nn.ParameterList(nn.Parameter(torch.zeros(o.factor_dim)) for _ in entries)

    def trains_clip(self):
        """``train_clip_bias``: every CLIP bias (q/k/v included), as the released config."""
        if not self.opts.train_clip_bias:
            return []
        return [p for name, p in self.clip.named_parameters() if name.endswith((".bias", ".in_proj_bias"))]

    def factor(self, tower: str, i: int) -> torch.Tensor | None:
        """The shared factor phi of block ``i`` of ``tower``, None where the layer is not tied."""
        k = self._cmt[tower].get(i)
        return None if k is None else self.cmt_factors[k]

    def branch(self, tower, i):
        adapter = (self.text_adapters if tower == "text" else self.video_adapters)[i]
        factor = self.factor(tower, i)
        return lambda site, inp, out: adapter(out, factor) if site == "mlp" else None

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def max_text_tokens(self) -> int:
        """At most ``text_len`` tokens: P_t has one row per position."""
        return min(super().max_text_tokens, self.opts.text_len)

    # -- forward -------------------------------------------------------------------------------------
    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() == 5 and video.shape[1] != self.frames:
            raise ValueError(f"MV-Adapter's temporal positions were built for {self.frames} frames, "
                             f"got {video.shape[1]}")
        return super().encode_frames(video)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        frames = self.encode_frames(video)
        return pool_frames(frames) if self.opts.frame_norm else frames.mean(dim=-2)
