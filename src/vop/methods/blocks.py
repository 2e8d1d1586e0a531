"""Shared building blocks of the prompt methods.

Shapes (ViT-B/32, 224 px): frames go through the image tower as N = B*F sequences of
[CLS, prompts..., 49 patches] with width d_v = 768; captions as [SOT, prompts..., words] of width
d_t = 512. Prompt tokens occupy a *slot* right after the prefix (the first token: [SOT], or the image
tower's [CLS]; a tower without [CLS] has none, ``visual.num_prefix``): every prompted layer writes its
own tokens into the slot (the previous layer's outputs there are dropped), and the slot is removed
after the last prompted layer, so outside prompted layers the sequences are exactly the backbone's.
The patches are always the last tokens of a frame's sequence (the last F*M of a video's in VoP^F's
joint layers): the runner gives every token before them the identity rotation on a RoPE tower
(vop.backbone.layers.Rope), so prompts carry no position there either. Every module returns the final
tokens of each frame in the frozen layout, read out by the tower (``clip.visual.readout``: [CLS], or an
attention pool that never sees a prompt).

Every module here lists its prompt tokens in ``no_weight_decay()`` (tokens are not weight matrices).

Prompts carry no positional embedding (they are learned per layer); words and patches keep CLIP's
positions, so with zero prompt tokens every model is exactly CLIP.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vop.backbone.clip import frame_summary

Run = Callable[..., torch.Tensor]  # run(layer_index, x[, tiles]) -> x (tiles: frames whose patches end x)


def prompt_param(*shape: int, std: float = 0.02) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


def write_slot(x: torch.Tensor, start: int, tokens: torch.Tensor | None, current: int) -> torch.Tensor:
    """Put ``tokens`` (N, n, d) at ``x[:, start:start+n]``, replacing a slot of ``current`` tokens.

    ``tokens=None`` removes the slot. One concatenation per layer, no Python loop over tokens.
    """
    if tokens is None:
        return x if current == 0 else torch.cat([x[:, :start], x[:, start + current:]], dim=1)
    return torch.cat([x[:, :start], tokens.to(x.dtype), x[:, start + current:]], dim=1)


def run_prompted(x: torch.Tensor, run: Run, layers: range, tokens_at: Callable[[int, torch.Tensor], torch.Tensor | None],
                 start: int = 1, tiles: int = 1) -> torch.Tensor:
    """Run ``layers`` with per-layer prompt tokens written into the slot at ``start``; returns x without the slot.
    ``tiles``: the sequences end with the patches of that many frames (VoP^F's joint layers)."""
    current = 0
    for i in layers:
        p = tokens_at(i, x)
        x = write_slot(x, start, p, current)
        current = 0 if p is None else p.shape[1]
        x = run(i, x) if tiles == 1 else run(i, x, tiles)
    return write_slot(x, start, None, current)


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
class TextPrompts(nn.Module):
    """Deep text prompts: each of ``depth`` layers from ``start`` (default: the first ``depth`` layers) gets
    its own n x d_t tokens, inserted right after [SOT].

    The text tower is causal, so tokens placed before the words can influence every word and [EOT],
    while [SOT] itself is untouched.
    """

    def no_weight_decay(self) -> set[str]:
        return {"tokens"}

    def __init__(self, layers: int, depth: int, n: int, width: int, start: int = 0):
        super().__init__()
        self.layers, self.depth, self.n = layers, min(depth, layers), n
        self.start = start  # the first prompted layer (0: from the input; layers - depth: the last layers)
        self.tokens = prompt_param(self.depth, n, width)

    def forward(self, x: torch.Tensor, run: Run) -> torch.Tensor:
        B = x.shape[0]
        lo, hi = self.start, self.start + self.depth
        at = lambda i, _x: self.tokens[i - lo].expand(B, -1, -1) if lo <= i < hi and self.n else None  # noqa: E731
        return run_prompted(x, run, range(self.layers), at)


class SplitTextPrompts(nn.Module):
    """Deep text prompts laid out as in the authors' released code (``semantics="modelscope"``).

    Every layer gets its own ``n_prefix`` tokens right after [SOT] and ``n_suffix`` tokens before the
    *last* position of the zero-padded sequence, replacing the previous layer's. ``forward`` takes the
    token embeddings *without* positions: CLIP's positional embedding is added after layer 0's prompts
    are inserted (prompts take positions, words shift by ``n_prefix``). The slots stay in after the
    last layer; the read-out index accounts for them.
    """

    def no_weight_decay(self) -> set[str]:
        return {"tokens"}

    def __init__(self, layers: int, n_prefix: int, n_suffix: int, width: int):
        super().__init__()
        self.layers = self.depth = layers
        self.n_prefix, self.n_suffix, self.n = n_prefix, n_suffix, n_prefix + n_suffix
        self.tokens = prompt_param(layers, self.n, width)

    def forward(self, x: torch.Tensor, run: Run, positional: torch.Tensor) -> torch.Tensor:
        B, p, s = x.shape[0], self.n_prefix, self.n_suffix
        for i in range(self.layers):
            tokens = self.tokens[i].expand(B, -1, -1)
            cur_p, cur_s = (p, s) if i else (0, 0)
            x = write_slot(x, 1, tokens[:, :p], cur_p)
            x = write_slot(x, x.shape[1] - 1 - cur_s, tokens[:, p:], cur_s)
            if i == 0:
                x = x + positional[: x.shape[1]].to(x.dtype)
            x = run(i, x)
        return x


# ------------------------------------------------------------------------------------------------
# video: sources of frame-level prompt tokens, per layer
# ------------------------------------------------------------------------------------------------
class FrameTokens(nn.Module):
    """Base of frame-level prompt sources: ``tokens(i, x, B, F)`` -> (B*F, n, d_v) or None. The ``depth``
    prompted layers start at layer ``start`` (0: the first layers; a source built for the last layers
    gets ``start = layers - depth``); ``layer(i)`` is the row of layer i's tokens, or None."""

    depth: int = 0
    start: int = 0

    def layer(self, i: int) -> int | None:
        return i - self.start if self.start <= i < self.start + self.depth else None

    def tokens(self, i: int, x: torch.Tensor, B: int, F: int) -> torch.Tensor | None:
        raise NotImplementedError


class SharedFrameTokens(FrameTokens):
    """Basic VoP: the same n tokens per layer for every frame of every video.

    ``first_norm`` (the authors' released code, ``semantics="modelscope"``): the first layer's tokens
    are inserted before the image tower's ``ln_pre`` and so go through it like [CLS] and the patches.
    """

    def no_weight_decay(self) -> set[str]:
        return {"shared"}

    def __init__(self, depth: int, n: int, width: int, first_norm: nn.Module | None = None):
        super().__init__()
        self.depth, self.n = depth, n
        self.shared = prompt_param(depth, n, width)
        self._first_norm = (first_norm,) if first_norm is not None else ()  # the backbone's: not registered here

    def tokens(self, i, x, B, F):
        j = self.layer(i)
        if j is None or self.n == 0:
            return None
        t = self._first_norm[0](self.shared[0]) if i == 0 and self._first_norm else self.shared[j]
        return t.expand(B * F, -1, -1)


class PositionFrameTokens(FrameTokens):
    """VoP^P: per layer, n_shared tokens for all frames + n_pos tokens specific to frame position j."""

    def no_weight_decay(self) -> set[str]:
        return {"shared", "position"}

    def frame_bound(self) -> str:
        return "position-specific prompts"

    def __init__(self, depth: int, n_shared: int, n_pos: int, frames: int, width: int):
        super().__init__()
        self.depth, self.frames = depth, frames
        self.shared = prompt_param(depth, n_shared, width)
        self.position = prompt_param(depth, frames, n_pos, width)

    def tokens(self, i, x, B, F):
        j = self.layer(i)
        if j is None:
            return None
        if F != self.frames:
            raise ValueError(f"position-specific prompts were built for {self.frames} frames, got {F}")
        shared = self.shared[j].expand(B, F, -1, -1)
        pos = self.position[j].expand(B, -1, -1, -1)
        return torch.cat([shared, pos], dim=2).flatten(0, 1)


class ContextModule(nn.Module):
    """VoP^C's context modelling: a 1-layer BiLSTM over the F frame-summary tokens ([CLS]) + a linear map to
    tokens.

    (B, F, d) -> (B, F, n_gen, d). Shared by every prompted layer.
    """

    def __init__(self, width: int, n_gen: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or width
        self.n_gen = n_gen
        self.lstm = nn.LSTM(width, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden, n_gen * width)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        B, F, d = cls.shape
        # cuDNN / autocast: run the recurrence in the parameters' dtype.
        with torch.autocast(device_type=cls.device.type, enabled=False):
            ctx, _ = self.lstm(cls.to(self.linear.weight.dtype))
            return self.linear(ctx).view(B, F, self.n_gen, d)


class ContextFrameTokens(FrameTokens):
    """VoP^C: per layer, n_shared learnable tokens + n_gen tokens generated from one "frame summary" token per
    frame as it enters the layer: [CLS] where the tower has one (``prefix`` 1), else the mean of the frame's
    ``patches`` patch tokens (prompts excluded; vop.backbone.clip.frame_summary). The generated tokens only
    prompt; [CLS] is never overwritten."""

    def no_weight_decay(self) -> set[str]:
        return {"shared"}

    def __init__(self, depth: int, n_shared: int, context: ContextModule, width: int, prefix: int = 1,
                 patches: int = 0):
        super().__init__()
        self.depth = depth
        self.shared = prompt_param(depth, n_shared, width)
        self.context = context
        self.prefix, self.patches = prefix, patches

    def tokens(self, i, x, B, F):
        j = self.layer(i)
        if j is None:
            return None
        gen = self.context(frame_summary(x, self.prefix, self.patches).reshape(B, F, -1)).flatten(0, 1)
        return torch.cat([self.shared[j].expand(B * F, -1, -1), gen.to(x.dtype)], dim=1)


# ------------------------------------------------------------------------------------------------
# video encoders: how frames flow through the image tower's blocks
# ------------------------------------------------------------------------------------------------
class FrameVideoPrompts(nn.Module):
    """Every layer works per frame; frame-level prompts from ``source`` sit between the prefix ([CLS]; ``prefix``
    tokens) and the patches. Returns each frame's final tokens, the slot removed."""

    def __init__(self, source: FrameTokens, layers: int, prefix: int = 1):
        super().__init__()
        self.source, self.layers, self.prefix = source, layers, prefix

    def forward(self, x: torch.Tensor, run: Run, B: int, F: int) -> torch.Tensor:
        return run_prompted(x, run, range(self.layers), lambda i, x: self.source.tokens(i, x, B, F), start=self.prefix)


class FunctionVideoPrompts(nn.Module):
    """VoP^F: layers < ks per frame with frame-level prompts; then a learnable frame position embedding
    is added to every token of frame j, and layers >= ks attend jointly over the whole video:
    one sequence [F CLS tokens (F x ``prefix``), n video-level prompts, F*M patches] per video, each patch
    keeping its own frame's rotary position (the per-frame table tiled F times; identity before). Returns
    each frame's own final tokens [CLS_j, patches_j], read out per frame by the tower.
    """

    def no_weight_decay(self) -> set[str]:
        return {"frame_position", "deep"} if self.ks < self.layers else set()

    def frame_bound(self) -> str | None:
        return "frame position embedding" if self.ks < self.layers else None

    def __init__(self, shallow: FrameTokens | None, layers: int, ks: int, frames: int, n_deep: int, width: int,
                 position_std: float = 0.02, prefix: int = 1):
        super().__init__()
        self.shallow, self.layers, self.ks, self.frames, self.n_deep = shallow, layers, ks, frames, n_deep
        self.prefix = prefix
        if ks < layers:
            self.frame_position = prompt_param(frames, width, std=position_std)
            self.deep = prompt_param(layers - ks, n_deep, width)

    def forward(self, x: torch.Tensor, run: Run, B: int, F: int) -> torch.Tensor:
        at = (lambda i, x: self.shallow.tokens(i, x, B, F)) if self.shallow is not None else (lambda i, x: None)
        P = self.prefix
        x = run_prompted(x, run, range(self.ks), at, start=P)
        if self.ks == self.layers:
            return x
        if F != self.frames:
            raise ValueError(f"the frame position embedding was built for {self.frames} frames, got {F}")
        N, T, d = x.shape  # T = P + M
        M = T - P
        x = x.view(B, F, T, d) + self.frame_position.to(x.dtype).view(1, F, 1, d)
        x = torch.cat([x[:, :, :P].reshape(B, F * P, d), x[:, :, P:].reshape(B, F * M, d)], dim=1)  # [F CLS, F*M patches]
        deep = lambda i, x: self.deep[i - self.ks].expand(B, -1, -1) if self.n_deep else None  # noqa: E731
        x = run_prompted(x, run, range(self.ks, self.layers), deep, start=F * P, tiles=F)
        # back to one sequence per frame, [CLS_j, patches_j]: the tower reads each frame out on its own tokens
        return torch.cat([x[:, :F * P].view(B, F, P, d), x[:, F * P:].view(B, F, M, d)], dim=2).view(B * F, T, d)


# ------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """Bottleneck adapter: up(relu(down(h))), up-projection zero-initialised so training starts at CLIP."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))
