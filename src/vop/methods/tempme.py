"""TempMe: Video Temporal Token Merging (Shen, Hao, He, Zhao, Zhang, Liu, Bao, Ding; ICLR 2025), as the
released code builds it (LunarShen/TempMe, HEAD e624930: ``tvr/models/module_tome_merge.py``,
``module_tome_patch.py``, ``module_clip.py``, ``modeling.py``, defaults of ``main.py``). Build spec:
``shared/spec/lora-tempme.md``, section 2.

LoRA-CLIP (:mod:`vop.methods.lora`, the fused-qkv update with one shared A, r = 8, in all 24 blocks) whose
image tower merges tokens: within each frame in the first layers (ImgMe), then across adjacent frames fused
into clips (ClipMe), so that the top layers see spatio-temporal context at a lower cost. The text tower is
LoRA-CLIP's. Frame [CLS] tokens are never merged and are read out as usual (meanP).

State carried through the image tower (``encode_frames``): the sequences (n, T, d) of a batch (S per
video, S = F at the input), every token's size s (how many original tokens it stands for; None until the
first merge, i.e. all 1) and the number c of [CLS] tokens at the front of each sequence (1, then the
product of the clip groups so far).

Merge M(x, s, metric, r, c) (:func:`merge_tokens`, the code's ``bipartite_soft_matching`` + ``merge_wavg``):
the c [CLS] tokens are set aside; the metric of the others is cosine-normalised (float32, no autocast, no
gradient), split alternately by position into a and b with the parity the [CLS] tokens would give (a = even
positions after them when c is even, odd when c is odd), each a-token's best cosine partner in b found, the
r a-tokens with the highest best scores merged into their partners as size-weighted means (sums of s x and
of s, then a division); output [CLS, unmerged a in order, b]. Indices carry no gradient; values do.

Every block uses proportional attention: logits + log s of the key (a float SDPA mask; none while every
size is 1, as the code). Per block l, with N tokens per sequence entering:

- ImgMe (l before the first clip layer): attention, then M with the keys averaged over heads as metric,
  r = min(``img_r``, (N - c) // 2), then the MLP. 50 -> 34 tokens per frame over layers 0..7 on ViT-B/32.
- ClipMe (l in ``clip_layers``, group g from ``clip_groups``): (1) regroup g adjacent sequences of a video
  into one, [CLS of all g, then their other tokens in order]; (2) cross-clip merge with the block's *input*
  hidden states as metric (taken before the position rows are added), r_C = min(int(N g (1 - ``keep_cross``)),
  (N - c) g // 2), after adding row j of the clip position embedding P_l (S_l x d, zero-initialised) to every
  token of the j-th sequence of each video (only when r_C > 0); (3) attention; (4) intra merge, key metric,
  r_I = min(int((N g - r_C) (1 - ``keep_intra``)), ((N - c) g - r_C) // 2); (5) the MLP. With g = 1 the code
  regroups nothing and skips (2), but still subtracts r_C in r_I's formula: so here.
- Other layers after the first clip layer: as ImgMe with r = min(int(N (1 - ``keep_intra``)), (N - c) // 2).
- Read-out: the first c tokens of each final sequence are the frames' [CLS] in frame order.

Token schedule on ViT-B/32, 12 frames (sequences per video x tokens at attention -> at the MLP): layer 0
12x50 -> 48, ..., layer 7 12x36 -> 34, layer 8 6x48 -> 44, layer 9 3x62 -> 56, layer 10 1x118 -> 107,
layer 11 1x107 -> 97 (:func:`schedule`; 97 of 600 tokens leave the tower). Image-tower multiply-adds per
12-frame video: 34.70 G against CLIP's (and merged LoRA's) 52.90 G (:func:`image_tower_macs`).

Defaults are the code's on a 12-layer tower with 12 frames: ``img_r=2``, ``clip_layers`` [8, 9, 10],
``clip_groups`` [2, 2, 3], ``keep_cross=0.7``, ``keep_intra=0.9`` (the fractions kept; the code's
``merge_token_proportion`` 30-10 gives the merged ones, 30 / 100 and 10 / 100: 1 - keep is rounded to 6
decimals so that 0.7 gives the code's float 0.3 exactly, :func:`merged_fraction`), ``clip_pos=True``,
``prop_attn=True``. ``clip_layers=None`` means the three layers below the last one (L-4, L-3, L-2; on towers
of fewer than 5 layers every layer but the last, at most 3), entries may count from the top (-1 the last);
``clip_groups=None`` means F factorised over the clip layers as evenly as possible, smallest first (12 over
three layers: 2, 2, 3; 8: 2, 2, 2; 64: 4, 4, 4), so that the whole video is one sequence after the last clip
layer, as in the code. The clip position embeddings have F, F/g_1, ... rows: with ``clip_pos`` the model
takes only the F it was built with (``frame_bound``); without, any multiple of the groups' product.

Counts (ViT-B/32 = ViT-B/16, 12 frames): LoRA 491,520 + P (12 + 6 + 3) x 768 = 16,128: 507,648.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vop import limits
from vop.errors import ConfigError
from vop.methods.lora import LoRA, LoRAOptions
from vop.methods.registry import Expected, Rates, register


# ------------------------------------------------------------------------------------------------
# the merge operator
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def match(metric: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of the non-[CLS] tokens of ``metric`` (n, T, m): indices (n, ., 1) into the
    a-set of the r merged tokens (``src``), of the kept ones in order (``unm``), and into the b-set of each
    merged token's partner (``dst``). Scores in float32 with autocast off, whatever the input's dtype."""
    device = metric.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else _nothing():
        m = metric[:, c:].float()
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = (m[:, ::2], m[:, 1::2]) if c % 2 == 0 else (m[:, 1::2], m[:, ::2])
        scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm = edge_idx[:, r:].sort(dim=1)[0]
    src = edge_idx[:, :r]
    dst = node_idx[..., None].gather(dim=1, index=src)
    return src, unm, dst


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor | None, metric: torch.Tensor, r: int, c: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """M(x, sizes, metric, r, c): merge r tokens of every sequence of ``x`` (n, T, d) as size-weighted means
    (``sizes`` (n, T, 1) float32, None = all 1), the first c ([CLS]) set aside -> (x (n, T - r, d), sizes)."""
    if r <= 0:
        return x, sizes
    n, T, d = x.shape
    src_idx, unm_idx, dst_idx = match(metric, r, c)
    s = torch.ones(n, T, 1, dtype=torch.float32, device=x.device) if sizes is None else sizes
    xs = torch.cat([x * s, s.to(torch.promote_types(x.dtype, s.dtype))], dim=-1)  # weighted values and sizes, moved together
    cls, rest = xs[:, :c], xs[:, c:]
    a, b = (rest[:, ::2], rest[:, 1::2]) if c % 2 == 0 else (rest[:, 1::2], rest[:, ::2])
    w = xs.shape[-1]
    unm = a.gather(dim=1, index=unm_idx.expand(n, a.shape[1] - r, w))
    src = a.gather(dim=1, index=src_idx.expand(n, r, w))
    b = b.scatter_reduce(1, dst_idx.expand(n, r, w), src, reduce="sum")
    out = torch.cat([cls, unm, b], dim=1)
    sizes = out[..., d:]
    return (out[..., :d] / sizes).to(x.dtype), sizes.float()


def regroup(x: torch.Tensor, g: int, c: int) -> torch.Tensor:
    """(n, T, ...) sequences with c [CLS] tokens in front -> (n / g, g T, ...): every g adjacent sequences
    as one, [the g c CLS tokens, then the g sequences' other tokens], in sequence order."""
    n, T = x.shape[:2]
    x = x.reshape(n // g, g, T, *x.shape[2:])
    return torch.cat([x[:, :, :c].flatten(1, 2), x[:, :, c:].flatten(1, 2)], dim=1)


# ------------------------------------------------------------------------------------------------
# the token schedule
# ------------------------------------------------------------------------------------------------
class Layer(NamedTuple):
    """One block of the image tower: ``kind`` "img" (ImgMe), "clip" (ClipMe) or "post"; per video ``seqs``
    sequences enter with ``tokens`` tokens each and ``cls`` [CLS] tokens; ``group`` of them are fused (1: none),
    ``r_cross`` tokens merged across the fused sequences before attention (applied only when group > 1),
    ``r`` after attention; ``attn_tokens`` / ``mlp_tokens``: per sequence at attention / at the MLP."""

    kind: str
    seqs: int
    tokens: int
    cls: int
    group: int
    r_cross: int
    r: int
    attn_tokens: int
    mlp_tokens: int


def schedule(tokens: int, frames: int, layers: int, clip_layers: list[int], groups: list[int], img_r: int,
             keep_cross: float, keep_intra: float) -> list[Layer]:
    """The per-layer token counts of the image tower (the code's ``get_video_feat`` arithmetic), for frames of
    ``tokens`` tokens ([CLS] + patches) and ``frames`` per video."""
    cross_ratio, intra_ratio = merged_fraction(keep_cross), merged_fraction(keep_intra)
    out, T, c, S = [], tokens, 1, frames
    first = min(clip_layers) if clip_layers else layers
    for i in range(layers):
        if i in clip_layers:
            g = groups[clip_layers.index(i)]
            r_c = min((T - c) * g // 2, int(T * g * cross_ratio))
            r_i = min(((T - c) * g - r_c) // 2, int((T * g - r_c) * intra_ratio))
            if g > 1:
                layer = Layer("clip", S, T, c, g, r_c, r_i, T * g - r_c, T * g - r_c - r_i)
                c, S = c * g, S // g
            else:  # the code: no regrouping, no cross merge; r_I as if r_C had been merged
                layer = Layer("clip", S, T, c, 1, r_c, r_i, T, T - r_i)
        elif i < first:
            r = min(img_r, (T - c) // 2)
            layer = Layer("img", S, T, c, 1, 0, r, T, T - r)
        else:
            r = min((T - c) // 2, int(T * intra_ratio))
            layer = Layer("post", S, T, c, 1, 0, r, T, T - r)
        out.append(layer)
        T = layer.mlp_tokens
    return out


def merged_fraction(keep: float) -> float:
    """The fraction of tokens merged, 1 - ``keep``, as the code's float: its proportions are integer percents
    divided by 100 (30 / 100 == 0.3), and 1 - 0.7 is 0.30000000000000004, which can floor a count one lower
    or higher; rounding to 6 decimals gives 0.3 (0.1 for 0.9) and keeps finer fractions."""
    return round((1.0 - keep) * 1e6) / 1e6


def balanced_groups(frames: int, n: int) -> list[int]:
    """``frames`` as a product of ``n`` factors, as even as possible (smallest largest factor, then fewest 1s),
    ascending: 12 over 3 -> [2, 2, 3], 8 -> [2, 2, 2], 64 -> [4, 4, 4], 4 -> [1, 2, 2]."""
    if n == 0:
        return []

    def factorisations(f: int, k: int, lo: int) -> list[list[int]]:
        if k == 1:
            return [[f]] if f >= lo else []
        return [[d, *rest] for d in range(lo, f + 1) if f % d == 0 for rest in factorisations(f // d, k - 1, d)]

    return min(factorisations(frames, n, 1), key=lambda fs: (max(fs), fs.count(1)))


def resolve_clip_layers(entries: list[int] | None, layers: int, name: str) -> list[int]:
    """``clip_layers`` as ascending block indices of a ``layers``-block image tower (None: the default)."""
    if entries is None:
        return list(range(max(0, layers - 4), layers - 1))
    out = []
    for e in entries:
        if not limits.is_int(e) or not -layers <= e < layers:
            raise ConfigError(f"{name} entry {e!r} is not a layer of the {layers}-layer image tower "
                              f"(give 0..{layers - 1}, or -1..-{layers} counted from the top)")
        out.append(e % layers)
    if out != sorted(set(out)):
        raise ConfigError(f"{name} must name distinct layers from the input up (ascending), got {entries}")
    return out


def no_merging(layers: int) -> dict[str, Any]:
    """The options under which TempMe merges nothing and fuses no frames on an image tower of ``layers`` blocks:
    ``lora`` exactly (and frozen CLIP while B = 0)."""
    n = len(resolve_clip_layers(None, layers, "clip_layers"))
    return dict(img_r=0, keep_cross=1.0, keep_intra=1.0, clip_groups=[1] * n)


def image_tower_macs(cfg, frames: int, sched: list[Layer] | None = None) -> int:
    """Multiply-adds of the image tower for one video of ``frames`` frames (patch embedding, every block's
    projections, attention products and MLP, the head; LayerNorms, softmax and the merges' bookkeeping not
    counted): CLIP's with ``sched=None``, else with the token counts of ``sched`` (:func:`schedule`)."""
    d, P, grid = cfg.width, cfg.patch_size, cfg.image_size // cfg.patch_size
    M = grid * grid
    hidden = int(round(d * cfg.mlp_ratio))
    macs = frames * M * 3 * P * P * d  # conv1
    rows = sched or [Layer("clip", frames, M + 1, 1, 1, 0, 0, M + 1, M + 1)] * cfg.layers
    for L in rows:
        n = L.seqs // L.group  # sequences at attention
        Ta, Tm = L.attn_tokens, L.mlp_tokens
        macs += n * (4 * d * d * Ta + 2 * Ta * Ta * d + 2 * d * hidden * Tm)
    return macs


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class ClipPositions(nn.Module):
    """P_l (S_l x d_v) for each cross-merging clip layer, zero-initialised: row j is added to every token of
    the j-th sequence of a video as it enters the layer's cross merge."""

    def no_weight_decay(self) -> set[str]:
        return {f"embedding.{k}" for k in range(len(self.embedding))}  # embeddings added to tokens: vop's rule

    def frame_bound(self) -> str | None:
        return "clip position embeddings (one row per frame, then per clip)" if len(self.embedding) else None

    def __init__(self, counts: list[int], width: int):
        super().__init__()
        self.embedding = nn.ParameterList(nn.Parameter(torch.zeros(n, width)) for n in counts)


@dataclass
class TempMeOptions(LoRAOptions):
    img_r: int = 2  # tokens merged per frame in each layer before the first clip layer (ImgMe)
    clip_layers: list[int] | None = None  # None: the three layers below the last (8, 9, 10 on ViT-B)
    clip_groups: list[int] | None = None  # sequences fused at each clip layer; None: F factorised evenly (2, 2, 3 at F=12)
    keep_cross: float = 0.7  # fraction of a fused clip's tokens kept by the merge across its frames (the code's 30% merged)
    keep_intra: float = 0.9  # fraction kept by the merge after attention in clip layers and later (the code's 10% merged)
    clip_pos: bool = True  # the clip position embeddings P_l (the code's frame_pos=1)
    prop_attn: bool = True  # proportional attention (logits + log size)

    def __post_init__(self) -> None:
        for f in ("clip_layers", "clip_groups"):  # one spelling, so that saved options compare equal
            if isinstance(getattr(self, f), tuple):
                setattr(self, f, list(getattr(self, f)))


@register("tempme", label="TempMe",
          rates=Rates(6e-4, 0.0, "TempMe's main.py: clip_lr 6e-4 for every TVPt tensor (LoRA, clip positions), AdamW, "
                                 "wd 0.2, warm-up 10% + cosine, 5 epochs, global batch 128 (4 GPUs x 32); CLIP frozen"),
          demo_rates=Rates(1e-2, 0.0, "validation t2v R@1 on the synthetic world: 39.1 (1e-3: 29.7, 3e-3: 32.8, "
                                      "3e-2: 29.7; docs/methods.md)"),
          # merging starts at once (the image tower is not CLIP's at init, the text tower is: LoRA's B = 0); adjacent
          # frames are fused, so the order matters; one cross-merging clip layer below the top as an option set
          expected=Expected(b32=507_648, clip_at_init=False, text_clip_at_init=True, frame_order=True,
                            identity=lambda cfg: no_merging(cfg.vision.layers),
                            option_sets=(({"clip_layers": [-2], "clip_groups": [2], "img_r": 1}, 491_520 + 12 * 768),
                                         ({"clip_pos": False, "prop_attn": False}, 491_520))))
class TempMe(LoRA):
    """TempMe (see the module docstring): LoRA on both towers, token merging in the image tower."""

    Options = TempMeOptions
    reads_cls = True  # each frame is read at its [CLS] token after the merging tower (the code's x[:, 0])

    @classmethod
    def unsupported_backbone(cls, cfg):
        if cfg.vision.rope:
            return ("its token merging averages patches of different positions (and, in clip layers, of different "
                   f"frames) into one token, and this image tower rotates each patch by its position (RoPE, {cfg.family}): "
                   "a merged token has no position to rotate by, and TempMe defines none; it runs on towers with "
                   "learned absolute positions (OpenAI's CLIP and the open_clip ViTs). Use lora on this backbone")
        return super().unsupported_backbone(cfg)

    @classmethod
    def check_options(cls, o, cfg, frames) -> None:
        super().check_options(o, cfg, frames)
        name = lambda f: f"model.options.{f} of {cls.name}"  # noqa: E731
        layers = cfg.vision.layers
        limits.check_int(o.img_r, name("img_r"), 0, limits.MAX_WIDTH)
        limits.check_float(o.keep_cross, name("keep_cross"), 0.0, 1.0)
        limits.check_float(o.keep_intra, name("keep_intra"), 0.0, 1.0)
        clip_layers = resolve_clip_layers(o.clip_layers, layers, name("clip_layers"))
        if o.clip_groups is None:
            return
        if len(o.clip_groups) != len(clip_layers):
            raise ConfigError(f"{name('clip_groups')} has {len(o.clip_groups)} entries for {len(clip_layers)} clip "
                              f"layers {clip_layers}: give one group size per clip layer")
        product = 1
        for g in o.clip_groups:
            limits.check_int(g, f"{name('clip_groups')} entry", 1, limits.MAX_FRAMES)
            product *= g
        if frames % product:
            raise ConfigError(f"{name('clip_groups')} {o.clip_groups} fuse {product} frames into one sequence, which does "
                              f"not divide model.frames={frames}: give frames a multiple of {product}, other groups, "
                              "or leave clip_groups out (then the frames are factorised evenly)")

    def build(self) -> None:
        super().build()
        o = self.opts
        v = self.clip.tower_config("visual")
        self.clip_layers = resolve_clip_layers(o.clip_layers, v.layers, "clip_layers")
        self.groups = list(o.clip_groups) if o.clip_groups is not None else balanced_groups(self.frames, len(self.clip_layers))
        self.group_product = 1
        counts = []
        for g in self.groups:  # a row per sequence entering each clip layer that fuses (and can cross-merge)
            if o.clip_pos and g > 1 and merged_fraction(o.keep_cross) > 0:
                counts.append(self.frames // self.group_product)
            self.group_product *= g
        self.clip_pos = ClipPositions(counts, v.width) if counts else None

    def check_frames(self, frames, source="this model"):
        frames = super().check_frames(frames, source)
        if frames % self.group_product:
            raise ConfigError(f"{source}: this {self.name} model fuses {self.group_product} frames into one sequence "
                              f"(clip groups {self.groups}), so --frames {frames} is not possible: give a multiple of "
                              f"{self.group_product}")
        return frames

    def schedule(self, tokens: int | None = None, frames: int | None = None) -> list[Layer]:
        """The token schedule for frames of ``tokens`` tokens (default: the backbone's image size)."""
        v = self.clip.tower_config("visual")
        o = self.opts
        tokens = tokens or (v.image_size // v.patch_size) ** 2 + 1
        return schedule(tokens, frames or self.frames, v.layers, self.clip_layers, self.groups, o.img_r,
                        o.keep_cross, o.keep_intra)

    # -- one layer ------------------------------------------------------------------------------------
    def _layer(self, i: int, L: Layer, pos: torch.Tensor | None, x: torch.Tensor, sizes: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        blk, upd = self.clip.blocks("visual")[i], self.updates("visual", i)
        c = L.cls
        if L.group > 1:
            metric = x.detach()  # the block's input hidden states, before the position rows
            if sizes is None:
                sizes = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
            if L.r_cross > 0 and pos is not None:  # row j of P_l to every token of each video's j-th sequence
                x = (x.unflatten(0, (-1, L.seqs)) + pos.to(x.dtype)[None, :, None]).flatten(0, 1)
            x, metric, sizes = regroup(x, L.group, c), regroup(metric, L.group, c), regroup(sizes, L.group, c)
            c = c * L.group
            x, sizes = merge_tokens(x, sizes, metric, L.r_cross, c)
        bias = sizes.log().transpose(1, 2)[:, None] if sizes is not None and self.opts.prop_attn else None
        h = blk.ln_1(x)
        if upd is not None:
            a, k = upd.attention(blk, h, bias=bias)
        else:  # towers="text": the frozen block's attention
            q, k, v = blk.attn.qkv(h)
            a = blk.attn.project_out(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype)))
        x = x + a
        x, sizes = merge_tokens(x, sizes, k.mean(1), L.r, c)
        h = blk.ln_2(x)
        return x + (upd.mlp(blk, h) if upd is not None else blk.mlp(h)), sizes

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, D): the frames' [CLS] embeddings after the merging image tower."""
        if video.dim() != 5:
            raise ValueError(f"videos must be B x F x 3 x H x W, got shape {tuple(video.shape)}")
        B, nf = video.shape[:2]
        if self.clip_pos is not None and nf != self.frames:
            raise ValueError(f"TempMe's clip position embeddings were built for {self.frames} frames, got {nf}")
        if nf % self.group_product:
            raise ValueError(f"TempMe fuses {self.group_product} frames into one sequence (groups {self.groups}); "
                             f"got {nf} frames")
        x = self.clip.visual.embed(video.flatten(0, 1))  # (B*F, 1 + M, d)
        sizes = None
        rows = iter(self.clip_pos.embedding) if self.clip_pos is not None else iter(())
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, L in enumerate(self.schedule(x.shape[1], nf)):
            pos = next(rows) if L.group > 1 and self.clip_pos is not None and merged_fraction(self.opts.keep_cross) > 0 else None
            if ckpt:
                x, sizes = checkpoint(self._layer, i, L, pos, x, sizes, use_reentrant=False)
            else:
                x, sizes = self._layer(i, L, pos, x, sizes)
        cls = x[:, :self.group_product].reshape(B, nf, -1)  # each final sequence starts with its frames' [CLS]
        return self.clip.visual.head(cls)
