"""An independent, minimal re-implementation of the authors' released forward pass (ModelScope,
modelscope/models/cv/vop_retrieval: model.py for VoP, model_se.py for the baselines), written from
its description with plain torch ops, to check vop's ``semantics="modelscope"`` against.

Everything works on an OpenAI-named CLIP state dict ``sd`` (float32) and, like the port's
``build_model``, uses width // 64 attention heads in both towers. Sequences are (L, N, d) as in the
port (nn.MultiheadAttention layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _block(x, sd, name, mask=None):
    """One residual block of the port: x + attn(ln_1 x), then + mlp(ln_2 x); QuickGELU."""
    d = x.shape[-1]
    h = _ln(x, sd, f"{name}.ln_1")
    a, _ = F.multi_head_attention_forward(
        h, h, h, d, d // 64, sd[f"{name}.attn.in_proj_weight"], sd[f"{name}.attn.in_proj_bias"], None, None, False, 0.0,
        sd[f"{name}.attn.out_proj.weight"], sd[f"{name}.attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)
    x = x + a
    h = F.linear(_ln(x, sd, f"{name}.ln_2"), sd[f"{name}.mlp.c_fc.weight"], sd[f"{name}.mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, sd[f"{name}.mlp.c_proj.weight"], sd[f"{name}.mlp.c_proj.bias"])


def _layers(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _patches(sd, images):
    """conv1 -> [CLS, patches] + positional embedding (no ln_pre yet); (N, 1+M, d)."""
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], 1) + sd["visual.positional_embedding"]


def _causal_mask(n=77):
    return torch.full((n, n), float("-inf")).triu_(1)


def _pool(frames, B):
    """L2-normalise every frame embedding, then average (the port's 'avg' pooling)."""
    f = frames / frames.norm(dim=-1, keepdim=True)
    return f.view(B, -1, f.shape[-1]).mean(1)


# ---------------------------------------------------------------------------------------------
# the baselines (model_se.py): plain CLIP with the fine-tuned weights, frames mean-pooled
def se_text(sd, tokens):
    """tokens (B, 77) -> L2-normalised (B, D)."""
    x = (F.embedding(tokens, sd["token_embedding.weight"]) + sd["positional_embedding"]).permute(1, 0, 2)
    for i in range(_layers(sd, "transformer.resblocks.")):
        x = _block(x, sd, f"transformer.resblocks.{i}", _causal_mask(x.shape[0]))
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    x = x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    return x / x.norm(dim=-1, keepdim=True)


def se_video(sd, video):
    """video (B, F, 3, H, W) -> (B, D): mean of the L2-normalised frame embeddings."""
    B = video.shape[0]
    x = _ln(_patches(sd, video.flatten(0, 1)), sd, "visual.ln_pre").permute(1, 0, 2)
    for i in range(_layers(sd, "visual.transformer.resblocks.")):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}")
    x = _ln(x[0], sd, "visual.ln_post") @ sd["visual.proj"]
    return _pool(x, B)


# ---------------------------------------------------------------------------------------------
# basic VoP (model.py)
def vop_video(sd, visual_prompts, video):
    """visual_prompts (L, 1, n, d): the port's visual_prompt_learner.visual_prompts.

    Every layer: the previous layer's prompts are cut out and this layer's go right after [CLS];
    at layer 0 they are inserted *before* ln_pre, so ln_pre normalises them too."""
    B = video.shape[0]
    n = visual_prompts.shape[2]
    x = _patches(sd, video.flatten(0, 1))
    N = x.shape[0]
    for i in range(_layers(sd, "visual.transformer.resblocks.")):
        if i > 0:
            x = torch.cat([x[:, :1], x[:, 1 + n:]], 1)  # drop the previous layer's prompts
        x = torch.cat([x[:, :1], visual_prompts[i].expand(N, -1, -1), x[:, 1:]], 1)
        if i == 0:
            x = _ln(x, sd, "visual.ln_pre")
        x = _block(x.permute(1, 0, 2), sd, f"visual.transformer.resblocks.{i}").permute(1, 0, 2)
    x = _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]
    return _pool(x, B)


def vop_text(sd, text_prompts, n_prefix, tokens):
    """text_prompts (L, n_prefix + n_suffix, d); tokens (B, 77 - n_prefix - n_suffix), zero-padded.

    Every layer: prefix prompts right after [SOT], suffix prompts before the *last* position of the
    sequence; the positional embedding (77 rows) is added at layer 0 after the insertion. The
    read-out is at argmax(tokens) + n_prefix + n_suffix."""
    n = text_prompts.shape[1]
    s = n - n_prefix
    x = F.embedding(tokens, sd["token_embedding.weight"])
    B = x.shape[0]
    for i in range(_layers(sd, "transformer.resblocks.")):
        if i > 0:  # drop the previous layer's prompts
            x = torch.cat([x[:, :1], x[:, 1 + n_prefix:x.shape[1] - 1 - s], x[:, -1:]], 1)
        pre, suf = text_prompts[i, :n_prefix].expand(B, -1, -1), text_prompts[i, n_prefix:].expand(B, -1, -1)
        x = torch.cat([x[:, :1], pre, x[:, 1:]], 1)
        x = torch.cat([x[:, :-1], suf, x[:, -1:]], 1)
        if i == 0:
            x = x + sd["positional_embedding"]  # fails unless the sequence is exactly 77 long, as in the port
        x = _block(x.permute(1, 0, 2), sd, f"transformer.resblocks.{i}", _causal_mask(x.shape[1])).permute(1, 0, 2)
    x = _ln(x, sd, "ln_final")
    x = x[torch.arange(B), tokens.argmax(-1) + n] @ sd["text_projection"]
    return x / x.norm(dim=-1, keepdim=True)


def tokenize(encode, texts, context):
    """The port's LengthAdaptiveTokenizer layout: [SOT] ids [EOT], truncated to ``context`` keeping
    [EOT], zero-padded to ``context`` (= 77 - prompt tokens). ``encode`` gives a text's BPE ids."""
    out = torch.zeros(len(texts), context, dtype=torch.long)
    for r, t in enumerate(texts):
        ids = [49406] + list(encode(t))[:context - 2] + [49407]
        out[r, :len(ids)] = torch.tensor(ids)
    return out
