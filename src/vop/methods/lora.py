"""LoRA (Hu et al., ICLR 2022) on a frozen CLIP, placed as the video-retrieval field places it: a rank-r
update of the *fused* q/k/v input projection of every block of both towers, one down-projection A shared
by q, k and v (TempMe, ICLR'25, and DiscoVLA, CVPR'25: LunarShen/TempMe ``tvr/models/module_clip.py``
``TVPt_LoRA_a`` / ``TVPt_LoRA_b``, text ``module_transformer.py``). Build spec:
``shared/spec/lora-tempme.md``, section 1.

For a frozen linear map y = W h + b (W out x in) the method trains A (r x in) and B (out x r) and computes
y = W h + b + s * B A drop(h), s = alpha / r. A is kaiming-uniform (a = sqrt 5, PyTorch's Linear default,
as every reference), B = 0: training starts at CLIP exactly. Defaults r = 8, alpha = 8 (s = 1: TempMe has
no scaling, peft's default alpha = r gives the same), dropout 0.

Placement (``targets``, comma-separated, any order):

- ``qkv`` (default): the fused in-projection (3d x d), one A (r x d) shared by q, k, v, B (3d x r); the
  update is added to q, k and v before the softmax. 4rd per block;
- ``q``, ``k``, ``v``: separate A/B per slice (loralib / peft style on a split projection), 2rd each;
- ``out``: the attention output projection, 2rd; ``c_fc``, ``c_proj``: the MLP's two linear maps, 5rd each;
- ``all``: q, k, v, out, c_fc, c_proj (every linear map of the block), 18rd.

``qkv`` cannot be combined with ``q``/``k``/``v``. ``towers``: ``both`` (default), ``visual`` or ``text``.

Counts on ViT-B/32 and ViT-B/16 (r = 8, d_v = 768, d_t = 512, 12 + 12 blocks): qkv 491,520 (294,912 image +
196,608 text); q,v 491,520; q,k,v and qkv,out 737,280; q,k,v,out 983,040; all 2,211,840.

The block (``block`` override, a branch cannot reach inside the softmax): h = ln_1(x); q, k, v =
``Attention.qkv(h)`` plus the update's slices (an exact zero while B = 0: frozen CLIP bit for bit), rotated
together on a RoPE tower; fused SDPA (causal in the text tower); ``Attention.project_out`` (``out``'s update
reads what ``out_proj`` reads: the merged heads, after EVA02's sub-LN); residual; the MLP (``MLP.hidden``
between its two maps, so SwiGLU too, with their updates when targeted); residual. Each update is sized from
the block's own map (the counts above are ViT's; EVA02's SwiGLU ``c_fc`` is 2 x hidden wide).

**Merged inference.** In eval mode (``model.eval()``, which every inference path of vop calls: ``vop eval``,
``vop index``, ``vop search``, ``vop serve``) the model writes W' = W + s B A into *copies* of the targeted
weights (non-persistent buffers of the method's modules; the shared backbone is never written: its
weights and fingerprint stay as they were) and runs each block as CLIP's with W': exactly CLIP's cost.
``train()`` drops the copies. Without gradients only: where autograd is recording and the update is
trainable, the unmerged path runs (so gradients reach A and B). ``merge()`` / ``unmerge()`` do it by
hand (``merge()`` refuses in train mode, where dropout makes the update stochastic);
``merge_on_eval = False`` switches the automatic merge off. A merged copy made before A or B changed
in place (a checkpoint loaded into an eval-mode model) is made again on the next forward.

The unmerged forward uses the tower API (``Attention.qkv``, ``project_out``) and the block's LayerNorms
and MLP; only the merge knows the backbone's parameter names and the fused q/k/v layout (:func:`base_linear`
and the merged branch of :meth:`BlockLoRA.qkv`): the two places a tower with split projections changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vop import limits
from vop.backbone.layers import ResidualAttentionBlock, RopeTable, apply_rope
from vop.errors import ConfigError
from vop.methods.base import VideoTextModel
from vop.methods.registry import Expected, Rates, register

#: what ``targets`` may name; "all" is every linear map of a block with q, k, v separate
SITES = ("qkv", "q", "k", "v", "out", "c_fc", "c_proj")
ALL = ("q", "k", "v", "out", "c_fc", "c_proj")
TOWER_CHOICES = {"both": ("visual", "text"), "visual": ("visual",), "text": ("text",)}


def parse_targets(targets: Any, where: str = "lora: targets") -> tuple[str, ...]:
    """``targets`` (``"qkv"``, ``"q,v"``, ``"all"`` ...) as a tuple of sites in :data:`SITES` order; a
    ConfigError naming the option otherwise."""
    if not isinstance(targets, str):
        raise ConfigError(f"{where} must be a comma-separated string such as 'qkv' or 'q,v', got {targets!r}")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if names == ["all"]:
        return ALL
    bad = [t for t in names if t not in SITES]
    if bad or not names:
        raise ConfigError(f"{where} names {', '.join(map(repr, bad)) or 'nothing'}: give a comma-separated list of "
                          f"{', '.join(SITES)} (or 'all' = {','.join(ALL)}), got {targets!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} names a site twice: {targets!r}")
    if "qkv" in names and {"q", "k", "v"} & set(names):
        raise ConfigError(f"{where}: 'qkv' (the fused projection, one A shared by q, k, v) cannot be combined with "
                          f"'q', 'k' or 'v' (separate updates of its slices), got {targets!r}")
    return tuple(s for s in SITES if s in names)


def base_linear(blk: ResidualAttentionBlock, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen (weight, bias) of ``site`` in a block: the one place that knows the backbone's names
    (used to merge; q, k, v are slices of ``qkv``)."""
    if site == "qkv":
        return blk.attn.in_proj_weight, blk.attn.bias()
    if site == "out":
        return blk.attn.out_proj.weight, blk.attn.out_proj.bias
    if site in ("c_fc", "c_proj"):
        lin = getattr(blk.mlp, site)
        return lin.weight, lin.bias
    raise ValueError(f"no linear map {site!r} in a block")


class LowRank(nn.Module):
    """The update s * B A of one linear map (in -> out): A (r x in) kaiming-uniform, B (out x r) zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """s * B A drop(h), (..., in) -> (..., out)."""
        if self.drop is not None:
            h = self.drop(h)
        out = F.linear(F.linear(h, self.A.to(h.dtype)), self.B.to(h.dtype))
        return out if self.scale == 1.0 else out * self.scale

    def weight(self) -> torch.Tensor:
        """s * B A, (out x in)."""
        w = self.B @ self.A
        return w if self.scale == 1.0 else w * self.scale


class BlockLoRA(nn.Module):
    """The updates of one block (``sites``) and, while merged, the merged copies of their weights."""

    def __init__(self, sites: tuple[str, ...], blk: ResidualAttentionBlock, rank: int, scale: float, dropout: float):
        super().__init__()
        width = blk.attn.in_proj_weight.shape[1]
        shape = {"q": (width, width), "k": (width, width), "v": (width, width)}  # slices of the fused projection
        for site in ("qkv", "out", "c_fc", "c_proj"):  # (in, out) of the block's own maps (SwiGLU's c_fc: 2 x hidden)
            out_features, in_features = base_linear(blk, site)[0].shape
            shape[site] = (in_features, out_features)
        self.sites = sites
        self.updates = nn.ModuleDict({s: LowRank(*shape[s], rank, scale, dropout) for s in sites})
        # merged copies (non-persistent: never in a checkpoint, moved with the model by .to())
        for s in ("qkv", "out", "c_fc", "c_proj"):
            self.register_buffer(f"merged_{s}", None, persistent=False)
        self._merged_versions: tuple[tuple[int, int], ...] | None = None

    # -- merging ----------------------------------------------------------------------------------
    def _versions(self) -> tuple[tuple[int, int], ...]:
        """Where the updates live and how often they were written in place (a merge is stale once they change)."""
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def merged_sites(self) -> tuple[str, ...]:
        """The backbone weights the updates change (q, k, v fold into ``qkv``)."""
        return tuple(dict.fromkeys("qkv" if s in ("q", "k", "v") else s for s in self.sites))

    @torch.no_grad()
    def merge(self, blk: ResidualAttentionBlock) -> None:
        for site in self.merged_sites():
            w = base_linear(blk, site)[0]
            merged = w.detach().clone()  # a copy: the backbone's tensor is never written
            if site == "qkv":
                d = w.shape[1]
                if "qkv" in self.updates:
                    merged += self.updates["qkv"].weight().to(merged.dtype)
                for j, s in enumerate(("q", "k", "v")):
                    if s in self.updates:
                        merged[j * d:(j + 1) * d] += self.updates[s].weight().to(merged.dtype)
            else:
                merged += self.updates[site].weight().to(merged.dtype)
            setattr(self, f"merged_{site}", merged)
        self._merged_versions = self._versions()

    def unmerge(self) -> None:
        for s in ("qkv", "out", "c_fc", "c_proj"):
            setattr(self, f"merged_{s}", None)
        self._merged_versions = None

    @property
    def is_merged(self) -> bool:
        return self._merged_versions is not None

    def merged(self, blk: ResidualAttentionBlock, site: str) -> torch.Tensor | None:
        """The merged weight of ``site`` to run with, or None: run the frozen weight plus the update. Merged
        weights are used only where no gradient is being recorded for a trainable update, and are made again
        if the update changed in place since the merge."""
        if self._merged_versions is None:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None
        if self._versions() != self._merged_versions:
            self.merge(blk)
        return getattr(self, f"merged_{site}")

    # -- the block's pieces ------------------------------------------------------------------------
    def qkv(self, blk: ResidualAttentionBlock, h: torch.Tensor, rope: RopeTable | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (n, heads, t, hd) of the block's attention on its normalised input h, with the updates;
        ``rope`` rotates the updated queries and keys (the rotation is linear: R(q + dq) = R q + R dq)."""
        attn = blk.attn
        n, t, d = h.shape
        w = self.merged(blk, "qkv")
        if w is not None:  # the tower's own computation with the merged weight (Attention.qkv's layout)
            q, k, v = F.linear(h, w, attn.bias()).view(n, t, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
            return (q, k, v) if rope is None else (apply_rope(q, rope), apply_rope(k, rope), v)
        q, k, v = attn.qkv(h)
        u = self.updates
        if "qkv" in u:
            dq, dk, dv = u["qkv"](h).view(n, t, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
            q, k, v = q + dq, k + dk, v + dv
        split = lambda z: z.view(n, t, attn.heads, d // attn.heads).transpose(1, 2)  # noqa: E731
        if "q" in u:
            q = q + split(u["q"](h))
        if "k" in u:
            k = k + split(u["k"](h))
        if "v" in u:
            v = v + split(u["v"](h))
        return (q, k, v) if rope is None else (apply_rope(q, rope), apply_rope(k, rope), v)

    def project_out(self, blk: ResidualAttentionBlock, o: torch.Tensor) -> torch.Tensor:
        """(n, heads, t, hd) attention outputs -> (n, t, width), with ``out``'s update."""
        if "out" not in self.updates:
            return blk.attn.project_out(o)
        w = self.merged(blk, "out")
        n, h, t, hd = o.shape
        flat = o.transpose(1, 2).reshape(n, t, h * hd)
        if blk.attn.norm is not None:  # EVA02's sub-LN: out_proj's input is the normalised heads
            flat = blk.attn.norm(flat)
        if w is not None:
            return F.linear(flat, w, blk.attn.out_proj.bias)
        return blk.attn.out_proj(flat) + self.updates["out"](flat)

    def mlp(self, blk: ResidualAttentionBlock, h: torch.Tensor) -> torch.Tensor:
        """The block's MLP on its normalised input, with ``c_fc`` / ``c_proj``'s updates."""
        u = self.updates
        if "c_fc" not in u and "c_proj" not in u:
            return blk.mlp(h)
        mlp = blk.mlp

        def linear(site: str, lin: nn.Linear, z: torch.Tensor) -> torch.Tensor:
            if site not in u:
                return lin(z)
            w = self.merged(blk, site)
            return F.linear(z, w, lin.bias) if w is not None else lin(z) + u[site](z)

        return linear("c_proj", mlp.c_proj, mlp.hidden(linear("c_fc", mlp.c_fc, h)))

    def attention(self, blk: ResidualAttentionBlock, h: torch.Tensor, causal: bool = False,
                  bias: torch.Tensor | None = None, rope: RopeTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's attention on h with the updates: (output (n, t, width), keys (n, heads, t, hd)).
        ``bias``: a float mask added to the logits (TempMe's log token sizes), broadcast to (n, heads, t, t)."""
        q, k, v = self.qkv(blk, h, rope)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), is_causal=causal)
        return self.project_out(blk, o), k

    def forward(self, blk: ResidualAttentionBlock, x: torch.Tensor, causal: bool = False,
                rope: RopeTable | None = None) -> torch.Tensor:
        """The whole block: x + attn(ln_1 x), then + mlp(ln_2 x)."""
        x = x + self.attention(blk, blk.ln_1(x), causal, rope=rope)[0]
        return x + self.mlp(blk, blk.ln_2(x))


@dataclass
class LoRAOptions:
    rank: int = 8  # r
    alpha: float = 8.0  # the update is scaled by alpha / rank (8 / 8 = 1: TempMe's, no scaling)
    dropout: float = 0.0  # on the input of A (peft's lora_dropout), training only
    targets: str = "qkv"  # qkv (fused, A shared) | q,v | q,k,v | qkv,out | q,k,v,out | all ... (see the docstring)
    towers: str = "both"  # both | visual | text


class LoRA(VideoTextModel):
    """LoRA on CLIP (see the module docstring): the updates live in ``self.lora[tower][i]`` (a
    :class:`BlockLoRA` per block of each targeted tower), parameters ``lora.<tower>.<i>.updates.<site>.A/B``."""

    Options = LoRAOptions
    #: fold the updates into copies of the weights in eval mode (see the module docstring)
    merge_on_eval: bool = True

    @classmethod
    def check_options(cls, o, cfg, frames) -> None:
        name = lambda f: f"model.options.{f} of {cls.name}"  # noqa: E731
        limits.check_int(o.rank, name("rank"), 1, limits.MAX_WIDTH, why="the rank of each low-rank update")
        limits.check_float(o.alpha, name("alpha"))
        limits.check_float(o.dropout, name("dropout"), 0.0, 1.0)
        if o.dropout >= 1.0:
            raise ConfigError(f"{name('dropout')} must be below 1 (1 drops every input of A), got {o.dropout}")
        parse_targets(o.targets, name("targets"))
        if o.towers not in TOWER_CHOICES:
            raise ConfigError(f"{name('towers')} must be one of {', '.join(TOWER_CHOICES)}, got {o.towers!r}")

    def build(self) -> None:
        o = self.opts
        self.targets = parse_targets(o.targets)
        self.towers = TOWER_CHOICES[o.towers]
        scale = o.alpha / o.rank
        self.lora = nn.ModuleDict()
        for tower in self.towers:
            self.lora[tower] = nn.ModuleList(BlockLoRA(self.targets, blk, o.rank, scale, o.dropout)
                                             for blk in self.clip.blocks(tower))

    def updates(self, tower: str, i: int) -> BlockLoRA | None:
        return self.lora[tower][i] if tower in self.lora else None

    def grad_start(self, tower):
        return 0 if tower in self.lora else None

    def block(self, tower, i, blk, x, causal, rope=None):
        upd = self.updates(tower, i)
        return blk(x, causal=causal, rope=rope) if upd is None else upd(blk, x, causal, rope)

    # -- merged inference ---------------------------------------------------------------------------
    def _block_updates(self):
        for tower in self.lora:
            yield from zip(self.lora[tower], self.clip.blocks(tower))

    def merge(self) -> "LoRA":
        """Fold every update into a copy of its weight (eval mode only; the backbone is not written)."""
        if self.training:
            raise RuntimeError(f"{self.name}: merge() in train mode is refused (dropout and the optimiser change the "
                               "update); call model.eval() first (which merges by itself)")
        for upd, blk in self._block_updates():
            upd.merge(blk)
        return self

    def unmerge(self) -> "LoRA":
        for upd, _ in self._block_updates():
            upd.unmerge()
        return self

    @property
    def merged(self) -> bool:
        return any(upd.is_merged for upd, _ in self._block_updates())

    def train(self, mode: bool = True) -> "LoRA":
        super().train(mode)
        if mode:
            self.unmerge()
        elif self.merge_on_eval:
            self.merge()
        return self


register("lora", label="LoRA",
         rates=Rates(6e-4, 0.0, "TempMe / DiscoVLA's rate for their LoRA tensors (clip_lr 6e-4, AdamW, wd 0.2, "
                                "warm-up 10% + cosine, 5 epochs, global batch 128); CLIP frozen"),
         demo_rates=Rates(1e-3, 0.0, "validation t2v R@1 on the synthetic world: 31.2 (3e-4: 29.7, 3e-3: 26.6, "
                                     "1e-2: 29.7; docs/methods.md)"),
         # B = 0: CLIP at initialisation; the spec's other placements (section 1 (c)) as option sets
         expected=Expected(b32=491_520, option_sets=(({"targets": "all"}, 2_211_840), ({"targets": "q,v"}, 491_520),
                                                     ({"targets": "q,k,v,out", "towers": "visual", "alpha": 16.0}, 589_824))))(LoRA)
