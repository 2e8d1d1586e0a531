"""A port-style basic VoP, for benchmarks only: how the authors' public port inserts prompts.

The public port of basic VoP (in ModelScope, ``vop_retrieval``) runs OpenAI's original CLIP code:
sequence-first (L, N, D) tensors, ``nn.MultiheadAttention`` blocks, a LayerNorm subclass that casts
to float32 and back, and, per layer, the prompts ``repeat``-ed for every frame (a copy) and
``torch.cat``-ed into a batch-first tensor that is then permuted to (L, N, D) for the block and back.
This module reimplements exactly those mechanics on top of our CLIP's weights, so that the cost of
our ``vop`` (batch-first, one concatenation per layer with ``expand``, fused
``scaled_dot_product_attention``) can be compared on the same weights and batch.

Two attention variants:
- ``mha``: ``nn.MultiheadAttention`` (sharing our blocks' parameters), as the port runs on today's
  PyTorch; in training mode it goes through ``F.multi_head_attention_forward``, which with
  ``need_weights=False`` calls ``scaled_dot_product_attention`` with an explicit additive mask for text;
- ``math``: the explicit ``softmax(QK^T / sqrt(d)) V`` with ``bmm`` that ``nn.MultiheadAttention`` ran
  in the PyTorch 1.x the port was written for (unfused; the score matrix is materialised).

Semantics follow *our* method, not the port's, wherever they differ, so that outputs agree and the
comparison is about mechanics only: ``ln_pre`` before the first prompts (the port applies it after
inserting them), no positional embedding on text prompts (the port adds positions after inserting
them), video embedding = mean of unnormalised frame embeddings (the port normalises each frame
first). Each difference is an O(tokens x width) operation, irrelevant to speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ln_fp32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's ``LayerNorm`` subclass: compute in float32, cast back to the input dtype."""
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps).type(x.dtype)


class MathAttention(nn.Module):
    """PyTorch 1.x ``F.multi_head_attention_forward`` math on (L, N, D) with ``need_weights=False``."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.heads = attn.heads
        self.in_proj_weight, self.in_proj_bias, self.out_proj = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        L, N, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q * (hd**-0.5)
        q = q.contiguous().view(L, N * h, hd).transpose(0, 1)
        k = k.contiguous().view(L, N * h, hd).transpose(0, 1)
        v = v.contiguous().view(L, N * h, hd).transpose(0, 1)
        w = torch.bmm(q, k.transpose(1, 2))
        if mask is not None:
            w = w + mask
        w = torch.softmax(w, dim=-1)
        out = torch.bmm(w, v).transpose(0, 1).contiguous().view(L, N, d)
        return self.out_proj(out)


class MHAAttention(nn.Module):
    """``nn.MultiheadAttention`` sharing the parameters of one of our ``Attention`` modules."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        d = attn.out_proj.in_features
        mha = nn.MultiheadAttention(d, attn.heads, device="meta")
        mha.in_proj_weight, mha.in_proj_bias = attn.in_proj_weight, attn.in_proj_bias
        mha.out_proj = attn.out_proj
        self.mha = mha

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            mask = mask.to(x.dtype)
        return self.mha(x, x, x, need_weights=False, attn_mask=mask)[0]


class PortBlock(nn.Module):
    """OpenAI CLIP's ``ResidualAttentionBlock`` on (L, N, D), with one of our blocks' weights."""

    def __init__(self, blk: nn.Module, attention: str):
        super().__init__()
        self.ln_1, self.ln_2, self.mlp = blk.ln_1, blk.ln_2, blk.mlp
        self.attn = {"mha": MHAAttention, "math": MathAttention}[attention](blk.attn)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(ln_fp32(self.ln_1, x), mask)
        return x + self.mlp(ln_fp32(self.ln_2, x))


class PortVoP(nn.Module):
    """Basic VoP the port's way, on the frozen CLIP of one of our ``vop`` models.

    The prompts are copies of the model's (own ``nn.Parameter``s, equal values), so both can be
    trained side by side without sharing optimiser state.
    """

    def __init__(self, model: nn.Module, attention: str = "mha"):
        super().__init__()
        clip = model.clip
        self.clip = clip
        self.visual_prompts = nn.Parameter(model.video_prompts.source.shared.detach().clone())  # (L, n, d_v)
        self.text_prompts = nn.Parameter(model.text_prompts.tokens.detach().clone())  # (L, n, d_t)
        self.visual_blocks = nn.ModuleList(PortBlock(b, attention) for b in clip.visual.transformer.resblocks)
        self.text_blocks = nn.ModuleList(PortBlock(b, attention) for b in clip.transformer.resblocks)
        ctx = clip.cfg.text.context_length
        mask = torch.empty(ctx, ctx, device=clip.positional_embedding.device).fill_(float("-inf")).triu_(1)
        self.register_buffer("causal", mask, persistent=False)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        v = self.clip.visual
        N = frames.shape[0]
        x = v.conv1(frames)
        x = x.reshape(N, x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(N, 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + v.positional(round(math.sqrt(x.shape[1]))).to(x.dtype)
        x = ln_fp32(v.ln_pre, x)
        n, layers = self.visual_prompts.shape[1], len(self.visual_blocks)
        for i, blk in enumerate(self.visual_blocks):
            vp = self.visual_prompts[i : i + 1].repeat(N, 1, 1).to(x.dtype)
            x = torch.cat([x[:, :1, :], vp, x[:, 1:, :]], dim=1)
            x = x.permute(1, 0, 2)
            x = blk(x)
            x = x.permute(1, 0, 2)
            if i + 1 < layers:  # the next layer has prompts of its own: drop these
                x = torch.cat([x[:, :1, :], x[:, 1 + n :, :]], dim=1)
        return ln_fp32(v.ln_post, x[:, 0, :]) @ v.proj

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        B, Fr = video.shape[:2]
        frames = self.encode_frames(video.reshape(B * Fr, *video.shape[2:])).reshape(B, Fr, -1)
        return (frames / frames.norm(dim=-1, keepdim=True)).mean(dim=1)  # meanP

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.clip
        B, T = tokens.shape
        x = c.token_embedding(tokens) + c.positional_embedding[:T]
        n, layers = self.text_prompts.shape[1], len(self.text_blocks)
        mask = self.causal[: T + n, : T + n]
        for i, blk in enumerate(self.text_blocks):
            tp = self.text_prompts[i : i + 1].expand(B, -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1, :], tp, x[:, 1:, :]], dim=1)
            x = x.permute(1, 0, 2)
            x = blk(x, mask)
            x = x.permute(1, 0, 2)
            if i + 1 < layers:
                x = torch.cat([x[:, :1, :], x[:, 1 + n :, :]], dim=1)
        x = ln_fp32(c.ln_final, x)
        return x[torch.arange(B, device=x.device), tokens.argmax(dim=-1) + n] @ c.text_projection

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.visual_prompts, self.text_prompts]

    def forward(self, video: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.encode_video(video), dim=-1), F.normalize(self.encode_text(tokens), dim=-1)


def check_agreement(model: nn.Module, port: PortVoP, video: torch.Tensor, tokens: torch.Tensor,
                    atol: float = 1e-4) -> dict[str, float]:
    """Forward outputs and prompt gradients of our ``vop`` and the port-style model, given equal prompts."""
    labels = torch.arange(video.shape[0], device=video.device)

    def loss_of(m):
        v, t = m(video, tokens)
        logits = m.logit_scale * t @ v.t()
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2, v, t

    for m in (model, port):
        for p_ in m.trainable_parameters():
            p_.grad = None
    la, va, ta = loss_of(model)
    lb, vb, tb = loss_of(port)
    la.backward()
    lb.backward()
    ga = [model.video_prompts.source.shared.grad, model.text_prompts.tokens.grad]
    gb = [port.visual_prompts.grad, port.text_prompts.grad]
    out = {"video_max_abs": (va - vb).abs().max().item(), "text_max_abs": (ta - tb).abs().max().item(),
           "grad_max_rel": max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(ga, gb))}
    for m in (model, port):
        for p_ in m.trainable_parameters():
            p_.grad = None
    ok = out["video_max_abs"] <= atol and out["text_max_abs"] <= atol and out["grad_max_rel"] <= 1e-2
    if not ok:
        raise AssertionError(f"port-style baseline disagrees with vop: {out}")
    return out
