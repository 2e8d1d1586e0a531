"""The CLIP dual encoder (ViT image tower + causal text tower) with OpenAI state-dict names.

The towers expose their stages (``embed`` -> blocks -> ``head``) so that prompt methods can run the
block loop themselves; ``encode_image`` / ``encode_text`` are the plain CLIP forward passes.

The tower API methods use (they never reach into ``transformer.resblocks``): ``blocks(tower)``,
``tower_config(tower)``, ``head_parameters(tower)`` (final LayerNorm + projection),
``projection(tower)``, a block's ``branch`` hook (vop.backbone.layers.Branch) and
``clamp_logit_scale()``. ``tower`` is ``"text"`` or ``"visual"``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from typing import Literal

from vop.backbone.config import CLIPConfig, TextConfig, VisionConfig
from vop.backbone.layers import Transformer

Tower = Literal["text", "visual"]
TOWERS: tuple[Tower, ...] = ("text", "visual")
#: the most the logit scale may reach (CLIP's training clamps exp(logit_scale) at 100)
MAX_LOGIT_SCALE = 100.0


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        scale = v.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(v.num_patches + 1, v.width))
        self.ln_pre = nn.LayerNorm(v.width)
        self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_ratio, cfg.act)
        self.ln_post = nn.LayerNorm(v.width)
        self.proj = nn.Parameter(scale * torch.randn(v.width, cfg.embed_dim))

    def positional(self, grid: int) -> torch.Tensor:
        """Positional embedding for a ``grid x grid`` patch layout, bicubically resized if needed."""
        pos = self.positional_embedding
        old = round(math.sqrt(pos.shape[0] - 1))
        if grid == old:
            return pos
        cls, patches = pos[:1], pos[1:]
        patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
        return torch.cat([cls, patches])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1 + M, width): patch tokens with [CLS] first, positions added, ln_pre."""
        x = self.conv1(images)  # N, d, g, g
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional(grid).to(x.dtype)
        return self.ln_pre(x)

    def no_weight_decay(self) -> set[str]:
        """Embeddings added to tokens are not weight matrices: no weight decay (as open_clip)."""
        return {"class_embedding", "positional_embedding"}

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        """[CLS] outputs of the last block -> projected embeddings."""
        return self.ln_post(cls) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed(images))
        return self.head(x[:, 0])


class CLIP(nn.Module):
    """CLIP with OpenAI's layout: ``visual.*`` for the image tower, the text tower at top level."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        t = cfg.text
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.act)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_weights()

    def init_weights(self) -> None:
        """OpenAI's initialisation (used for random models in tests and for the tiny pretraining)."""
        t = self.cfg.text
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower, width in ((self.transformer, t.width), (self.visual.transformer, self.cfg.vision.width)):
            layers = tower.layers
            proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
            attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
            for blk in tower.resblocks:
                nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width**-0.5)

    # text tower stages -------------------------------------------------------------------------
    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, width) with the first T positional embeddings added."""
        T = tokens.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"{T} tokens exceed the text context of {self.positional_embedding.shape[0]}")
        return self.token_embedding(tokens) + self.positional_embedding[:T]

    def text_head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Last-block outputs -> projected embedding read at the [EOT] token (the largest id)."""
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def no_weight_decay(self) -> set[str]:
        """The text tower's embeddings (the image tower lists its own)."""
        return {"token_embedding.weight", "positional_embedding"}

    # tower API ---------------------------------------------------------------------------------------
    def _tower(self, tower: Tower) -> Transformer:
        if tower == "text":
            return self.transformer
        if tower == "visual":
            return self.visual.transformer
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")

    def blocks(self, tower: Tower) -> nn.ModuleList:
        """The residual blocks of ``tower``, input side first."""
        return self._tower(tower).resblocks

    def tower_config(self, tower: Tower) -> TextConfig | VisionConfig:
        self._tower(tower)
        return self.cfg.text if tower == "text" else self.cfg.vision

    def projection(self, tower: Tower) -> nn.Parameter:
        """The tower's final projection to the joint space (``text_projection`` / ``visual.proj``)."""
        self._tower(tower)
        return self.text_projection if tower == "text" else self.visual.proj

    def head_parameters(self, tower: Tower) -> list[nn.Parameter]:
        """What reads the tower out after its last block: the final LayerNorm and the projection."""
        norm = self.ln_final if tower == "text" else self.visual.ln_post
        return [*norm.parameters(), self.projection(tower)]

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        """Keep exp(logit_scale) in [1, ``max_scale``] (CLIP's training does this after every step). A frozen
        logit scale is left as it is: it is not trained, and a model shares it with the CLIP it was given."""
        if self.logit_scale.requires_grad:
            self.logit_scale.clamp_(0, math.log(max_scale))

    # plain CLIP ------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed_text(tokens), causal=True)
        return self.text_head(x, tokens)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)
