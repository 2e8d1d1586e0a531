"""The dual encoder (ViT image tower + text tower) with OpenAI state-dict names, for every family vop builds.

OpenAI's CLIP, Meta's PE-Core, EVA02-CLIP and Google's SigLIP / SigLIP2 share this module; the architecture
record (vop.backbone.config) says which parts a tower has: [CLS] or none, ln_pre, patch bias, the block's
q/k/v bias, sub-LN and MLP kind (vop.backbone.layers), 2-D RoPE, the read-out ([CLS] token or an attention
pool), the projection (none for SigLIP's image tower) and its bias, the text tower's mask and pooling, its
tokenizer (CLIP's BPE, or a file the user gives: ``tokenizer_file``), a logit bias.

The towers expose their stages (``embed`` -> blocks -> read-out) so that prompt methods can run the
block loop themselves; ``encode_image`` / ``encode_text`` are the plain forward passes.

The tower API methods use (they never reach into ``transformer.resblocks``): ``blocks(tower)``,
``tower_config(tower)``, ``rope(tower, tokens, tiles)`` (the rotation of a sequence whose last tokens are
patches; None without RoPE), ``head_parameters(tower)`` (what reads the tower out: final LayerNorm,
attention pool, projection), ``projection(tower)`` / ``projection_parameters(tower)`` / ``project(tower, z)``,
``visual.readout(x)`` (the final token sequence -> embeddings), ``visual.summary(x)`` (one token per frame),
a block's ``branch`` hook (vop.backbone.layers.Branch), ``tokenizer(context)`` and ``clamp_logit_scale()``.
``tower`` is ``"text"`` or ``"visual"``. No code outside this module assumes ``x[:, 0]`` is [CLS].
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from typing import Literal

from vop.backbone.config import CLIPConfig, TextConfig, VisionConfig
from vop.backbone.layers import AttentionPool, Rope, RopeTable, Transformer

Tower = Literal["text", "visual"]
TOWERS: tuple[Tower, ...] = ("text", "visual")
#: the most the logit scale may reach (CLIP's training clamps exp(logit_scale) at 100)
MAX_LOGIT_SCALE = 100.0


def frame_summary(x: torch.Tensor, prefix: int, patches: int) -> torch.Tensor:
    """(N, T, width) -> (N, width): one token summing up each frame: [CLS] (the first token) where the tower has
    one (``prefix`` 1), else the mean of its ``patches`` patch tokens (the last ones: prompts excluded)."""
    return x[:, 0] if prefix else x[:, -patches:].mean(dim=1)


def block_options(c: VisionConfig | TextConfig) -> dict:
    """The keyword options of a tower's blocks (vop.backbone.layers.ResidualAttentionBlock)."""
    if isinstance(c, TextConfig):
        return {"eps": c.eps}
    return {"eps": c.eps, "qkv_bias": c.qkv_bias, "attn_norm": c.attn_norm, "mlp": c.mlp, "mlp_norm": c.mlp_norm}


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        v = self.cfg = cfg.vision
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=v.patch_bias)
        scale = v.width**-0.5
        if v.class_token:
            self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(v.num_patches + v.num_prefix, v.width))
        self.ln_pre = nn.LayerNorm(v.width, eps=v.eps) if v.ln_pre else nn.Identity()
        self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_ratio, cfg.vision_act, **block_options(v))
        self.ln_post = nn.LayerNorm(v.width, eps=v.eps)
        self.proj = nn.Parameter(scale * torch.randn(v.width, cfg.embed_dim)) if v.proj else None
        self.proj_bias = nn.Parameter(torch.zeros(cfg.embed_dim)) if v.proj_bias else None
        # the pool's MLP has the tower's activation (timm's AttentionPoolLatent gets the tower's act_layer)
        self.attn_pool = (AttentionPool(v.width, v.attn_pool_heads, v.pool_mlp_width, cfg.vision_act, v.eps)
                          if v.pool == "map" else None)
        self.rope = (Rope(v.grid, v.head_dim, v.rope_theta, v.rope_offset, v.rope_indexing, v.rope_ref_grid)
                     if v.rope else None)

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches in the frozen sequence ([CLS]: 1; a class-less tower: 0): where prompt
        slots go."""
        return self.cfg.num_prefix

    def positional(self, grid: int) -> torch.Tensor:
        """Positional embedding for a ``grid x grid`` patch layout, bicubically resized if needed."""
        pos = self.positional_embedding
        n = self.num_prefix
        old = round(math.sqrt(pos.shape[0] - n))
        if grid == old:
            return pos
        if self.rope is not None:
            raise ValueError(f"this image tower (2-D RoPE) runs at its native resolution only: a {grid} x {grid} "
                             f"patch grid, not {old} x {old} ({self.cfg.image_size} px)")
        cls, patches = pos[:n], pos[n:]
        patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
        return torch.cat([cls, patches])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P + M, width): [CLS] (if the tower has one: P = 1) then the M patch tokens,
        positions added, ln_pre (if any)."""
        x = self.conv1(images)  # N, d, g, g
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if self.num_prefix:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = x + self.positional(grid).to(x.dtype)
        return self.ln_pre(x)

    def rope_table(self, tokens: int, tiles: int = 1) -> RopeTable | None:
        """The rotation of a sequence of ``tokens`` tokens whose last ``tiles * M`` are patches (identity for the
        rest); None for a tower without RoPE."""
        return None if self.rope is None else self.rope.table(tokens, tiles)

    def no_weight_decay(self) -> set[str]:
        """Embeddings added to tokens are not weight matrices: no weight decay (as open_clip)."""
        out = {"positional_embedding"} | ({"class_embedding"} if self.num_prefix else set())
        return out | ({"attn_pool.probe"} if self.attn_pool is not None else set())

    @property
    def token_readout(self) -> bool:
        """The tower is read out at one token ([CLS]), not by an attention pool over all tokens."""
        return self.attn_pool is None

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """(..., width) -> (..., embed_dim): the projection to the joint space (and its bias, if any); the
        identity for a tower without one (SigLIP: its read-out is the embedding)."""
        if self.proj is None:
            return z
        z = z @ self.proj
        return z if self.proj_bias is None else z + self.proj_bias

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        """(N, width) read-out tokens (a [CLS] output, or a token a method reads the same way) -> embeddings:
        ln_post, projection. Only for a tower read out at [CLS] (:attr:`token_readout`)."""
        if self.attn_pool is not None:
            raise ValueError("this image tower is read out by an attention pool over all its tokens, not at one "
                             "token: use readout(x) on the final token sequence")
        return self.project(self.ln_post(cls))

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, width) final tokens in the frozen layout (any prompt slot removed) -> (N, embed_dim): [CLS]
        -> ln_post -> projection, or ln_post on every token -> attention pool -> projection."""
        if self.attn_pool is None:
            return self.project(self.ln_post(x[:, 0]))
        return self.project(self.attn_pool(self.ln_post(x)))

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, width) -> (N, width): one token summing up each frame as it enters a layer: [CLS] where the
        tower has one, else the mean of the patch tokens (the last M; prompts excluded)."""
        return frame_summary(x, self.num_prefix, self.cfg.num_patches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        x = self.transformer(x, rope=self.rope_table(x.shape[1]))
        return self.readout(x)


class CLIP(nn.Module):
    """A dual encoder with OpenAI's layout: ``visual.*`` for the image tower, the text tower at top level."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        t = cfg.text
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.text_act, **block_options(t))
        self.ln_final = nn.LayerNorm(t.width, eps=t.eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.text_projection_bias = nn.Parameter(torch.zeros(cfg.embed_dim)) if t.proj_bias else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if cfg.logit_bias else None
        #: the tokenizer file of a text tower whose vocabulary vop does not ship (SigLIP: ``tokenizer.json`` or a
        #: SentencePiece ``.model``), set by load_clip / build_clip (``tokenizer=``); None: none given
        self.tokenizer_file: Path | None = None
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
        pool = self.visual.attn_pool
        if pool is not None:
            width = self.cfg.vision.width
            nn.init.normal_(pool.probe, std=width**-0.5)
            nn.init.normal_(pool.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(pool.attn.out_proj.weight, std=width**-0.5)

    # text tower stages -------------------------------------------------------------------------
    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, width) with the first T positional embeddings added."""
        T = tokens.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"{T} tokens exceed the text context of {self.positional_embedding.shape[0]}")
        return self.token_embedding(tokens) + self.positional_embedding[:T]

    def text_head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Last-block outputs -> projected embedding, read at the [EOT] token (the largest id) or, for a tower
        pooled at the last position, at the last token."""
        x = self.ln_final(x)
        if self.cfg.text.pool == "last":
            return self.project("text", x[:, -1])
        eot = tokens.argmax(dim=-1)
        return self.project("text", x[torch.arange(x.shape[0], device=x.device), eot])

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

    def rope(self, tower: Tower, tokens: int, tiles: int = 1) -> RopeTable | None:
        """The rotary table for a sequence of ``tokens`` of ``tower`` whose last ``tiles`` * M tokens are the
        patches of ``tiles`` frames (vop.backbone.layers.Rope.table); None where the tower has no RoPE."""
        self._tower(tower)
        return self.visual.rope_table(tokens, tiles) if tower == "visual" else None

    def projection(self, tower: Tower) -> nn.Parameter | None:
        """The weight of the tower's final projection to the joint space (``text_projection`` /
        ``visual.proj``, width x embed_dim); :meth:`projection_parameters` adds its bias, if any. None for an
        image tower without a projection (SigLIP: the attention pool's output is the embedding)."""
        self._tower(tower)
        return self.text_projection if tower == "text" else self.visual.proj

    def projection_parameters(self, tower: Tower) -> list[nn.Parameter]:
        """The projection's weight and, where the tower has one, its bias (none at all for a tower without a
        projection)."""
        weight = self.projection(tower)
        bias = self.text_projection_bias if tower == "text" else self.visual.proj_bias
        return [p for p in (weight, bias) if p is not None]

    def project(self, tower: Tower, z: torch.Tensor) -> torch.Tensor:
        """(..., width) read-out features of ``tower`` -> (..., embed_dim)."""
        if tower == "visual":
            return self.visual.project(z)
        self._tower(tower)
        z = z @ self.text_projection
        return z if self.text_projection_bias is None else z + self.text_projection_bias

    def head_parameters(self, tower: Tower) -> list[nn.Parameter]:
        """What reads the tower out after its last block: the final LayerNorm, the attention pool (if any) and
        the projection."""
        norm = self.ln_final if tower == "text" else self.visual.ln_post
        pool = self.visual.attn_pool if tower == "visual" else None
        return [*norm.parameters(), *(pool.parameters() if pool is not None else ()), *self.projection_parameters(tower)]

    @property
    def preprocess(self):
        """How frames become this backbone's input (vop.backbone.config.Preprocess, from the architecture record):
        every place frames are prepared (training, evaluation, indexing, search, the demo) reads it."""
        return self.cfg.vision.preprocess

    def tokenizer(self, context_length: int | None = None):
        """The tokenizer of this backbone's text tower. CLIP's BPE: ``context_length`` ids per text (default: the
        tower's context). A tower read at its last position (SigLIP) always gets its whole context (the pads take
        part in attention: a shorter sequence would be another model), and ``context_length`` caps the caption's
        tokens within it; its vocabulary is read from :attr:`tokenizer_file` (a ConfigError saying how to give
        one when it is not set)."""
        from vop.backbone.tokenizer import CLIPTokenizer, FileTokenizer, missing_tokenizer

        t = self.cfg.text
        if t.tokenizer == "clip":
            return CLIPTokenizer(context_length or t.context_length)
        if self.tokenizer_file is None:
            raise missing_tokenizer(self.cfg)
        return FileTokenizer(self.tokenizer_file, t.tokenizer, t.context_length, budget=context_length,
                             vocab_size=t.vocab_size)

    def logits(self, cosine: torch.Tensor) -> torch.Tensor:
        """Scaled scores of cosine similarities: exp(logit_scale) * cosine (+ logit_bias, SigLIP's). Rankings (the
        retrieval metrics) do not depend on the scale or the bias; sigmoid(logits) is SigLIP's match probability
        (:meth:`match_probability`)."""
        out = self.logit_scale.exp() * cosine
        return out if self.logit_bias is None else out + self.logit_bias

    def match_probability(self, cosine: torch.Tensor) -> torch.Tensor:
        """SigLIP's probability that a text and an image (video) match: sigmoid(exp(logit_scale) * cosine +
        logit_bias), the quantity its sigmoid loss trained. A backbone without a logit bias (CLIP's softmax
        training) has no such calibrated probability: a ValueError."""
        if self.logit_bias is None:
            raise ValueError("this backbone has no logit bias (a softmax-trained CLIP): its scores are not sigmoid "
                             "match probabilities; rank by the cosine similarity")
        return torch.sigmoid(self.logits(cosine))

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        """Keep a *trained* exp(logit_scale) in [1, ``max_scale``] (CLIP's training does this after every step).
        A frozen scale is the backbone's own and is left as loaded: it is not trained, and a model shares it with
        the CLIP it was given."""
        if self.logit_scale.requires_grad:
            self.logit_scale.clamp_(0, math.log(max_scale))

    # plain CLIP ------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed_text(tokens), causal=self.cfg.text.causal)
        return self.text_head(x, tokens)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)
