"""DGL: Dynamic Global-Local prompt tuning (Yang, Zhu, Wang, Yang; AAAI 2024), as the released code
(knightyxp/DGL, HEAD 9139fd1) builds it. Two registered methods, differing only in the prompt generator:

- ``dgl`` (the transformer generator): learnable E (depth, n_text + n_local*F, d_v), N(0, 1); one shared
  pre-LN transformer block G (width d_v, the image tower's head count, MLP 4*d_v, QuickGELU, no mask, no
  positions) runs on each layer's tokens separately, H[l] = G(E[l]). Text prompts T[l] = MLP_t(H[l][:n_text])
  (Linear d_v -> 2*d_v, QuickGELU, Linear 2*d_v -> d_t); frame f's local prompts are
  H[l][n_text + n_local*f : n_text + n_local*(f+1)] (d_v, no projection): one set per frame *position*, so
  ``dgl`` is tied to the F frames it was built with (``frame_bound``).
- ``dgl-l`` (the linear generator): learnable V (depth, n_local, d_v), shared by every frame;
  text prefix = V[l] W_pre^T + b_pre, postfix = V[l] W_post^T + b_post (two Linear d_v -> d_t); needs
  n_text = 2 * n_local.

The generator reads only learned tensors: the prompts are the same for every sample ("dynamic" in the
paper's sense of generated, not input-conditioned) and can be exported as constants after training
(``export_prompts``, ``fold_prompts``).

Text tower (causal, frozen): CLIP positions are added to the words first; the prompts carry none. Layer l
sees [SOT, n_text//2 prefix prompts, w_1 .. w_{T-1}, the rest as postfix prompts] (T + n_text tokens); the
slots are overwritten with layer l's prompts before every prompted layer and left in place after. Read-out at
[EOT] (its index shifted by the prefix), ln_final, text_projection. The postfix slot sits after every [EOT]:
under the causal mask it never reaches the read-out (``postfix=False`` drops it, outputs unchanged; in
``dgl-l`` W_post is then ``inert``: trainable, counted, never influencing the output).

Image tower (frozen), per video: n_global global prompts P_G (U(-a, a), a = sqrt(6 / (3 P^2 + d_v)), P the
patch size) are inserted once after ln_pre and carried through every layer; each frame is
[CLS, n_local local prompts, patches], the local slot overwritten before every prompted layer. Every block runs
its frozen weights as a *global-local* attention (:func:`global_local_attention`): frame tokens attend to the
global prompts and their own frame, the global prompts to everything; then each token's MLP. Video
embedding (``readout``): ``global0`` (ln_post(first global prompt) @ proj, the code's default),
``global_mean``, ``cls_mean`` (meanP of the frames' [CLS] embeddings, this codebase's pooling) or
``global_cls_mean`` (plain mean of the projected global prompts and frame [CLS] tokens, as the code's ablation).

Counts on ViT-B/32 and ViT-B/16, 12 frames: ``dgl`` 9,575,168 (G 7,087,872 + MLP_t 1,968,128 + E 516,096 +
P_G 3,072); ``dgl-l`` 827,392 (V 36,864 + W_pre, W_post 787,456 + P_G 3,072), of which W_post's 393,728 inert.
Weight decay (the one protocol, vop's rule): none on the prompt tokens E, V, P_G (listed in
``no_weight_decay``), nor on biases and LayerNorms; the generator's weight matrices are decayed. The
released recipe decays every tensor whose name lacks "bias" (prompts and LayerNorm gains included).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vop.backbone.layers import Attention, QuickGELU, ResidualAttentionBlock
from vop.errors import ConfigError
from vop.methods.base import VideoTextModel, check_depth, check_prompt_tokens, check_text_prompts, pool_frames
from vop.methods.blocks import write_slot
from vop.methods.registry import Expected, Rates, register

READOUTS = ("global0", "global_mean", "cls_mean", "global_cls_mean")


@dataclass
class DGLOptions:
    n_text: int = 8  # text prompts per layer: n_text // 2 after [SOT], the rest appended at the end
    n_local: int = 4  # local prompts per frame and layer
    n_global: int = 4  # global prompts per video (inserted once, carried through every layer)
    depth: int | None = None  # prompted layers counted from the input; None: every layer (12 on ViT-B, the code's)
    readout: str = "global0"  # video embedding: global0 | global_mean | cls_mean | global_cls_mean
    postfix: bool = True  # keep the (inert) postfix text slot, as the code; False drops it, outputs unchanged


def uniform_prompt(shape: tuple[int, ...], patch_size: int, width: int) -> nn.Parameter:
    """The code's prompt init (VPT's): U(-a, a), a = sqrt(6 / (3 * patch_size^2 + width))."""
    a = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
    return nn.Parameter(torch.empty(*shape).uniform_(-a, a))


# ------------------------------------------------------------------------------------------------
# the global-local video attention
# ------------------------------------------------------------------------------------------------
def global_local_attention(attn: Attention, g: torch.Tensor, x: torch.Tensor, frames: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One frozen attention layer over a video held as global tokens ``g`` (B, G, d) and per-frame tokens
    ``x`` (B*F, T, d), both already normalised (ln_1). q/k/v are computed once with the layer's weights;
    two SDPA calls: every frame's T queries over [global; own frame] (G + T keys) and the G global queries
    over [global; all frames] (G + F*T keys). Equal to one attention over the video's G + F*T tokens with
    the block mask "frame tokens see global + own frame, global tokens see all". Returns the projected
    outputs (B, G, d), (B*F, T, d). With G = 0 it is the layer's own attention, per frame."""
    qx, kx, vx = attn.qkv(x)  # (N, h, T, hd), N = B*F
    N, h, T, hd = qx.shape
    B, G = g.shape[0], g.shape[1]
    if G == 0:
        return g, attn.project_out(F.scaled_dot_product_attention(qx, kx, vx))
    qg, kg, vg = attn.qkv(g)  # (B, h, G, hd)

    def per_frame(t: torch.Tensor) -> torch.Tensor:  # (B, h, G, hd) -> (B*F, h, G, hd)
        return t.unsqueeze(1).expand(B, frames, h, G, hd).reshape(N, h, G, hd)

    def whole_video(t: torch.Tensor) -> torch.Tensor:  # (B*F, h, T, hd) -> (B, h, F*T, hd)
        return t.view(B, frames, h, T, hd).transpose(1, 2).reshape(B, h, frames * T, hd)

    local = F.scaled_dot_product_attention(qx, torch.cat([per_frame(kg), kx], 2), torch.cat([per_frame(vg), vx], 2))
    glob = F.scaled_dot_product_attention(qg, torch.cat([kg, whole_video(kx)], 2), torch.cat([vg, whole_video(vx)], 2))
    return attn.project_out(glob), attn.project_out(local)


def global_local_block(blk: ResidualAttentionBlock, g: torch.Tensor, x: torch.Tensor, frames: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen pre-LN block on (global, frames): t + global-local attention(ln_1 t), then t + mlp(ln_2 t)."""
    a_g, a_x = global_local_attention(blk.attn, blk.ln_1(g), blk.ln_1(x), frames)
    x = x + a_x
    x = x + blk.mlp(blk.ln_2(x))
    if g.shape[1]:
        g = g + a_g
        g = g + blk.mlp(blk.ln_2(g))
    return g, x


def video_attention_mask(n_global: int, frames: int, tokens: int, device=None) -> torch.Tensor:
    """The boolean mask (True: may attend) of the one-attention equivalent over [global; frame 1; ...; frame F]:
    global rows see everything, a frame's rows the global tokens and their own frame."""
    L = n_global + frames * tokens
    frame_of = torch.cat([torch.full((n_global,), -1), torch.arange(frames).repeat_interleave(tokens)]).to(device)
    mask = (frame_of[:, None] == frame_of[None, :]) | (frame_of[None, :] == -1) | (frame_of[:, None] == -1)
    assert mask.shape == (L, L)
    return mask


# ------------------------------------------------------------------------------------------------
# prompt generators: () -> text prompts (depth, n_pre + n_post, d_t), local prompts (depth, F or 1, n_local, d_v)
# ------------------------------------------------------------------------------------------------
class TransformerPromptGenerator(nn.Module):
    """``dgl``: E (depth, n_text + n_local*F, d_v) -> G (one pre-LN block, per layer) -> MLP_t for the text part."""

    def no_weight_decay(self) -> set[str]:
        return {"embedding"}

    def frame_bound(self) -> str | None:
        return "frame-position-specific local prompts" if self.n_local else None

    def __init__(self, depth: int, n_text: int, n_text_used: int, n_local: int, frames: int, d_v: int, d_t: int,
                 heads: int):
        super().__init__()
        self.n_text, self.n_text_used, self.n_local, self.frames = n_text, n_text_used, n_local, frames
        self.embedding = nn.Parameter(torch.randn(depth, n_text + n_local * frames, d_v))  # nn.Embedding's N(0, 1)
        self.block = ResidualAttentionBlock(d_v, heads, 4.0, "quick_gelu")
        # nn.MultiheadAttention's defaults (the code's G): xavier-uniform q/k/v, zero attention biases
        nn.init.xavier_uniform_(self.block.attn.in_proj_weight)
        nn.init.zeros_(self.block.attn.in_proj_bias)
        nn.init.zeros_(self.block.attn.out_proj.bias)
        self.text_mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_v, 2 * d_v)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(2 * d_v, d_t))])) if n_text else None

    def forward(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h = self.block(self.embedding)  # each layer's tokens are one sequence: (depth, n_text + n_local*F, d_v)
        text = self.text_mlp(h[:, : self.n_text_used]) if self.text_mlp is not None and self.n_text_used else None
        local = h[:, self.n_text:].unflatten(1, (self.frames, self.n_local)) if self.n_local else None
        return text, local


class LinearPromptGenerator(nn.Module):
    """``dgl-l``: V (depth, n_local, d_v), shared by all frames; text = [W_pre V + b_pre, W_post V + b_post]."""

    def no_weight_decay(self) -> set[str]:
        return {"visual"}

    def __init__(self, depth: int, n_local: int, d_v: int, d_t: int, patch_size: int, postfix: bool):
        super().__init__()
        self.visual = uniform_prompt((depth, n_local, d_v), patch_size, d_v)
        self.prefix = nn.Linear(d_v, d_t)
        self.postfix = nn.Linear(d_v, d_t) if postfix else None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.prefix(self.visual)
        if self.postfix is not None:
            text = torch.cat([text, self.postfix(self.visual)], dim=1)
        return text, self.visual.unsqueeze(1)


class GlobalPrompts(nn.Module):
    """P_G (n_global, d_v): the video-level prompts, inserted once after ln_pre and never overwritten."""

    def no_weight_decay(self) -> set[str]:
        return {"tokens"}

    def __init__(self, n: int, d_v: int, patch_size: int):
        super().__init__()
        self.tokens = uniform_prompt((n, d_v), patch_size, d_v)

    def forward(self, B: int, dtype: torch.dtype) -> torch.Tensor:
        return self.tokens.to(dtype).expand(B, -1, -1)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class DGL(VideoTextModel):
    """DGL with the transformer prompt generator (see the module docstring)."""

    Options = DGLOptions
    linear: ClassVar[bool] = False

    @classmethod
    def check_options(cls, opts, cfg, frames) -> None:
        name = lambda f: f"model.options.{f} of {cls.name}"  # noqa: E731
        check_text_prompts(opts.n_text, cfg, name("n_text"))
        check_prompt_tokens(opts.n_local, name("n_local"))
        check_prompt_tokens(opts.n_global, name("n_global"))
        check_depth(opts.depth, name("depth"))

    def grad_start(self, tower):
        if tower == "text":
            return 0 if self.text_prompt_tokens else None
        return 0 if (self.global_prompts is not None or (self.generator is not None and self.opts.n_local)) else None

    @property
    def video_prompt_tokens(self) -> int:
        return self.opts.n_local if self.generator is not None and self.visual_depth else 0

    def build(self) -> None:
        o, t, v = self.opts, self.clip.tower_config("text"), self.clip.tower_config("visual")
        if o.readout not in READOUTS:
            raise ConfigError(f"option readout of {self.name} must be one of {', '.join(READOUTS)}, got {o.readout!r}")
        if o.readout.startswith("global") and not o.n_global:
            raise ConfigError(f"readout={o.readout!r} reads the global prompts: it needs n_global >= 1 (or readout='cls_mean')")
        if self.linear and o.n_text != 2 * o.n_local:
            raise ConfigError(f"{self.name}: the prefix and postfix text prompts are linear maps of the n_local={o.n_local} "
                              f"visual prompts, so n_text must be 2 * n_local = {2 * o.n_local}, got {o.n_text}")
        deepest = max(t.layers, v.layers)
        self.depth = deepest if o.depth is None else min(o.depth, deepest)
        self.text_depth, self.visual_depth = min(self.depth, t.layers), min(self.depth, v.layers)
        self.n_pre = o.n_text // 2
        self.n_post = o.n_text - self.n_pre if o.postfix else 0
        self.generator: nn.Module | None = None
        if self.depth and (o.n_local or (o.n_text and not self.linear)):
            if self.linear:
                self.generator = LinearPromptGenerator(self.depth, o.n_local, v.width, t.width, v.patch_size, o.postfix)
            else:
                self.generator = TransformerPromptGenerator(self.depth, o.n_text, self.n_pre + self.n_post, o.n_local,
                                                            self.frames, v.width, t.width, v.heads)
        self.global_prompts = GlobalPrompts(o.n_global, v.width, v.patch_size) if o.n_global else None
        self._folded: dict[str, torch.Tensor | None] | None = None
        self._per_position = self.generator is not None and bool(getattr(self.generator, "frame_bound", lambda: None)())

    # -- prompts ------------------------------------------------------------------------------------
    def generate(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This forward's prompts: text (depth, n_pre + n_post, d_t), local (depth, F or 1, n_local, d_v)."""
        if self._folded is not None:
            return self._folded["text"], self._folded["local"]
        return self.generator() if self.generator is not None else (None, None)

    @torch.no_grad()
    def export_prompts(self) -> dict[str, torch.Tensor | None]:
        """Every prompt as a constant: text (depth, n_pre + n_post, d_t; prefix first), local
        (depth, F for dgl or 1 for dgl-l, n_local, d_v), global (n_global, d_v)."""
        text, local = self.generator() if self.generator is not None else (None, None)
        glob = self.global_prompts.tokens if self.global_prompts is not None else None
        return {k: None if t is None else t.detach().clone() for k, t in (("text", text), ("local", local), ("global", glob))}

    def fold_prompts(self, enabled: bool = True) -> "DGL":
        """Run the generator once and use its outputs as constants (inference: the prompts do not depend on the
        input). Training mode unfolds them again."""
        self._folded = self.export_prompts() if enabled else None
        return self

    def train(self, mode: bool = True) -> "DGL":
        if mode:
            self._folded = None
        return super().train(mode)

    # -- text ---------------------------------------------------------------------------------------
    @property
    def text_prompt_tokens(self) -> int:
        return self.n_pre + self.n_post if self.generator is not None and self.text_depth else 0

    @property
    def max_text_tokens(self) -> int:
        """The words keep CLIP's positions (the prompts take none), so the caption budget is CLIP's context."""
        return self.clip.cfg.text.context_length

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_text_length(tokens)
        x = self.clip.embed_text(tokens)  # positions added before the prompts are inserted
        run = self._runner("text")
        text, _ = self.generate()
        B, T = tokens.shape
        pre, post = self.n_pre, self.n_post
        inserted = text is not None and self.text_depth > 0
        for i in range(len(self.clip.blocks("text"))):
            if inserted and i < self.text_depth:
                p = text[i].to(x.dtype).expand(B, -1, -1)
                x = write_slot(x, 1, p[:, :pre], pre if i else 0)
                if post:  # appended after the (padded) words: [SOT, prefix, w_1 .. w_{T-1}, postfix]
                    x = torch.cat([x[:, : pre + T], p[:, pre:]], dim=1)
            x = run(i, x)
        if inserted:  # drop both slots: the read-out (ln_final, projection) is per token, at [EOT]
            x = torch.cat([x[:, :1], x[:, 1 + pre: pre + T]], dim=1)
        return self.clip.text_head(x, tokens)

    # -- video --------------------------------------------------------------------------------------
    def _block(self, blk: ResidualAttentionBlock, g: torch.Tensor, x: torch.Tensor, frames: int):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(global_local_block, blk, g, x, frames, use_reentrant=False)
        return global_local_block(blk, g, x, frames)

    def encode_tokens(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, 3, H, W) -> last-block outputs of the global prompts (B, n_global, d_v) and of the frames'
        [CLS] tokens (B, F, d_v), before ln_post / proj."""
        if video.dim() != 5:
            raise ValueError(f"videos must be B x F x 3 x H x W, got shape {tuple(video.shape)}")
        B, nf = video.shape[:2]
        _, local = self.generate()
        if self._per_position and nf != self.frames:
            raise ValueError(f"DGL's frame-position-specific local prompts were built for {self.frames} frames, got {nf}")
        x = self.clip.visual.embed(video.flatten(0, 1))  # (B*F, 1 + M, d_v), after ln_pre
        g = (self.global_prompts(B, x.dtype) if self.global_prompts is not None else x.new_zeros(B, 0, x.shape[-1]))
        current = 0
        for i, blk in enumerate(self.clip.blocks("visual")):
            if local is not None and i < self.visual_depth:
                p = local[i].expand(B, nf, -1, -1).flatten(0, 1)
                x = write_slot(x, 1, p, current)
                current = p.shape[1]
            g, x = self._block(blk, g, x, nf)
        return g, x[:, 0].view(B, nf, -1)

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, D): the frames' [CLS] embeddings of the global-local pass."""
        _, cls = self.encode_tokens(video)
        return self.clip.visual.head(cls)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, D), read out as option ``readout`` says (default: the first global prompt)."""
        g, cls = self.encode_tokens(video)
        r = self.opts.readout
        if r == "global0":
            return self.clip.visual.head(g[:, 0])
        if r == "global_mean":
            return self.clip.visual.head(g).mean(1)
        if r == "cls_mean":
            return pool_frames(self.clip.visual.head(cls))
        return torch.cat([self.clip.visual.head(g), self.clip.visual.head(cls)], dim=1).mean(1)  # global_cls_mean


_WHY = ("knightyxp/DGL scripts/msrvtt.sh: lr 2e-3 for every new tensor (AdamW, wd 0.2, 5 epochs, batch 128 x 4 GPUs); "
        "CLIP frozen")

# demo rates: validation t2v R@1 of one seed on the synthetic world (64 captions), lr 1e-3 / 3e-3 / 1e-2:
# dgl 17.2 / 25.0 / 25.0 (tie broken by R1+R5+R10: 171.9 vs 165.6); dgl-l 17.2 / 21.9 / 28.1 (3e-2: 23.4)
register("dgl", label="DGL", rates=Rates(2e-3, 0.0, _WHY),
         demo_rates=Rates(3e-3, 0.0, "validation t2v R@1 on the synthetic world: 25.0 (1e-3: 17.2, 1e-2: 25.0)"),
         # the video embedding is the first global prompt's (readout global0), not meanP
         expected=Expected(b32=9_575_168, clip_at_init=False, frame_order=True, mean_pooled=False))(DGL)


@register("dgl-l", label="DGL (linear)",
          rates=Rates(2e-3, 0.0, _WHY + "; the repo's linear-generator scripts: LSMDC and ActivityNet 1e-2, VATEX 5e-3"),
          demo_rates=Rates(1e-2, 0.0, "validation t2v R@1 on the synthetic world: 28.1 (1e-3: 17.2, 3e-3: 21.9, 3e-2: 23.4)"),
          # local prompts shared by every frame, global prompts without positions: the order of the frames is not seen
          expected=Expected(b32=827_392, clip_at_init=False, mean_pooled=False, token_tensors=("visual",)))
class DGLLinear(DGL):
    """DGL with the linear prompt generator (see the module docstring)."""

    linear = True
    # its postfix prompts sit after every [EOT] under the causal mask: W_post never gets a gradient
    inert = ("generator.postfix.weight", "generator.postfix.bias")
