"""OpenAI's CLIP ViT module layout (openai/CLIP clip/model.py: LayerNorm, QuickGELU, ResidualAttentionBlock
with nn.MultiheadAttention, Transformer, VisionTransformer, CLIP), restated from its description to
write TorchScript archives laid out like OpenAI's released ``.pt`` files, for the tests.

As in OpenAI's archives, the root module also holds the tensors ``input_resolution``,
``context_length`` and ``vocab_size``, and the text blocks hold the causal mask as a plain tensor
attribute (in the archive, not in the state dict). ``Payload`` is a hostile submodule whose
TorchScript ``__setstate__`` writes a file when ``torch.jit.load`` reads it.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """Computes in float32 whatever the input dtype (as OpenAI's, for fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attn_mask
        if mask is not None:
            mask = mask.to(dtype=x.dtype, device=x.device)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int, vision_patch_size: int,
                 context_length: int, vocab_size: int, transformer_width: int, transformer_heads: int, transformer_layers: int):
        super().__init__()
        self._context = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        max(1, vision_width // 64), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, self.build_attention_mask())
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(transformer_width ** -0.5 * torch.randn(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * 4.6052)
        # OpenAI's archives carry these as tensors (clip.load reads model.input_resolution.item())
        self.register_buffer("input_resolution", torch.tensor(image_resolution))
        self.register_buffer("context_length", torch.tensor(context_length))
        self.register_buffer("vocab_size", torch.tensor(vocab_size))

    def build_attention_mask(self) -> torch.Tensor:
        return torch.full((self._context, self._context), float("-inf")).triu_(1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.type(self.visual.conv1.weight.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text).type(self.visual.conv1.weight.dtype)
        x = (x + self.positional_embedding.type(x.dtype)).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text)


class Payload(nn.Module):
    """Loading it runs its TorchScript ``__setstate__``, which writes ``marker`` (6 bytes of 'P')."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.training = state[2]
        t = torch.from_file(self.marker, shared=True, size=6, dtype=torch.uint8)
        t.fill_(80)
        self.weight = state[1] + t[0].float() * 0  # uses t, so the write is not optimised away


def build(sd: dict[str, torch.Tensor] | None = None, *, width: int = 64, layers: int = 2, heads: int = 2,
          image: int = 32, patch: int = 8, embed: int = 64, text_width: int | None = None, text_heads: int | None = None,
          seed: int = 0) -> CLIP:
    """OpenAI's module layout at these sizes (the defaults: vop's ``tiny``), random or with ``sd``'s
    tensors (OpenAI names; the three scalars are kept from the build)."""
    torch.manual_seed(seed)
    m = CLIP(embed, image, layers, width, patch, 77, 49408, text_width or width, text_heads or heads, layers).eval()
    if sd is not None:
        own = m.state_dict()
        missing = set(own) - set(sd) - {"input_resolution", "context_length", "vocab_size"}
        unexpected = set(sd) - set(own)
        assert not missing and not unexpected, (missing, unexpected)
        m.load_state_dict({**own, **sd})
    return m


def save_archive(path: Path, model: CLIP, *, mode: str = "trace", dtype: torch.dtype = torch.float32,
                 payload: str | None = None) -> Path:
    """``torch.jit.trace`` (as OpenAI's released files) or ``torch.jit.script`` the model, in ``dtype``,
    optionally with a ``Payload`` submodule writing ``payload`` when loaded; ``torch.jit.save`` it."""
    import copy

    m = copy.deepcopy(model)
    if dtype != torch.float32:
        m = m.to(dtype)  # integer buffers (the scalars) keep their dtype
    if payload is not None:
        m.payload = torch.jit.script(Payload(payload))
    if mode == "trace":
        res = int(m.input_resolution)
        images = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0)).to(dtype)
        tokens = torch.randint(1, 400, (2, 77), generator=torch.Generator().manual_seed(0))
        tokens[:, 5] = 49407
        with torch.no_grad():
            sm = torch.jit.trace(m, (images, tokens), check_trace=False)
    else:
        sm = torch.jit.script(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(sm, str(path))
    return path
