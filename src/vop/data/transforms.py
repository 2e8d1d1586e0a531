"""Pixel transforms on whole tensors (any leading dims, e.g. ``(B, F, 3, H, W)``), CPU or GPU.

The loader hands out uint8 frames already brought to ``size`` x ``size`` (cheap to move between
processes and to the GPU) as the backbone was trained: shortest side + centre crop, bicubic (CLIP,
EVA02-CLIP), or squashed, bilinear (PE-Core) (:func:`resize_frames`, the architecture record's
:class:`~vop.backbone.config.Preprocess`); the model side then calls :func:`to_model_input`, which does
the optional training augmentation (one random resized crop + flip per video, shared by its frames) and
the normalisation with the backbone's mean and std on the device where the batch lives.

Training draws each video's crop and flip with :func:`augment_draws`, from a generator of its own
seeded by (seed, epoch, sample index): the same augmentation whatever the batch it lands in, its
position there, the rank that loads it, the number of processes, micro-batches or loader workers.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vop.backbone.config import CLIP_MEAN, CLIP_STD, Preprocess

__all__ = ["CLIP_MEAN", "CLIP_STD", "Preprocess", "resize_center_crop", "resize_frames", "normalize", "augment",
           "augment_draws", "to_model_input"]


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W), got {tuple(x.shape)}")
    lead = tuple(x.shape[:-3])
    return x.reshape(-1, *x.shape[-3:]), lead


def _interpolate(flat: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize keeping the dtype (on CPU, uint8 uses torch's native uint8 kernel, which rounds
    between the two separable passes: values can differ by a few levels from the float path)."""
    if flat.dtype == torch.uint8 and flat.device.type == "cpu":  # native uint8 kernel: ~5x faster
        return F.interpolate(flat, size=size, mode=mode, align_corners=False, antialias=True)
    y = F.interpolate(flat.float(), size=size, mode=mode, align_corners=False, antialias=True)
    if flat.dtype == torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y


def resize_center_crop(x: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic or bilinear, antialiased) and centre-crop ``size x size``.

    ``x``: ``(..., 3, H, W)``; uint8 in -> uint8 out, float in -> float out. One interpolate
    call for all frames.
    """
    flat, lead = _flat(x)
    h, w = flat.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        flat = _interpolate(flat, (nh, nw), interpolation)[..., top : top + size, left : left + size]
    return flat.reshape(*lead, 3, size, size)


def resize_frames(x: torch.Tensor, size: int, preprocess: Preprocess | None = None) -> torch.Tensor:
    """``(..., 3, H, W)`` -> ``(..., 3, size, size)`` as ``preprocess`` says (None: CLIP's shortest side + centre
    crop, bicubic; :func:`resize_center_crop`): "crop", or "squash" (both sides to ``size``, no crop, the
    aspect ratio not kept: PE-Core's), with its interpolation, antialiased; dtype kept."""
    if preprocess is None or preprocess.resize == "crop":
        return resize_center_crop(x, size, preprocess.interpolation if preprocess is not None else "bicubic")
    flat, lead = _flat(x)
    if tuple(flat.shape[-2:]) != (size, size):
        flat = _interpolate(flat, (size, size), preprocess.interpolation)
    return flat.reshape(*lead, 3, size, size)


def normalize(x: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """uint8 (or float in 0..255) ``(..., 3, H, W)`` -> float32 with the backbone's mean/std (default: CLIP's)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


#: SeedSequence spawn key of the augmentation stream: independent of the frame-sampling stream
#: (``default_rng([seed, epoch, index])`` in ``vop.data.dataset``), which uses the same entropy
AUGMENT_STREAM = 0x61756721
#: uniform numbers one video's augmentation consumes (area, aspect, centre x, centre y, flip)
AUGMENT_DRAWS = 5


def augment_draws(seed: int, epoch: int, indices: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """The random numbers of :func:`augment` for each sample: ``(len(indices), 5)`` float64 on the CPU.

    Row ``i`` comes from a numpy generator of its own, seeded by ``(seed, epoch, indices[i])`` (a
    ``SeedSequence`` hashes them; a separate stream from the frame sampling's): a sample's crop and
    flip do not depend on the other samples of its batch, its position, the rank or the worker that
    loaded it. ``indices`` are dataset (sample) indices, e.g. ``batch["index"]``.
    """
    idx = indices.tolist() if hasattr(indices, "tolist") else list(indices)
    out = np.empty((len(idx), AUGMENT_DRAWS), dtype=np.float64)
    for row, i in enumerate(idx):
        ss = np.random.SeedSequence([int(seed), int(epoch), int(i)], spawn_key=(AUGMENT_STREAM,))
        out[row] = np.random.default_rng(ss).random(AUGMENT_DRAWS)
    return torch.from_numpy(out)


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    draws: torch.Tensor | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Random resized crop (area ``scale``, aspect ``ratio``) and horizontal flip, per video.

    ``x``: ``(B, F, 3, S, S)`` (uint8 or float); the frames of one video share one crop and flip.
    The random parameters are ``draws`` (``(B, 5)`` uniform numbers in [0, 1), one row per video:
    :func:`augment_draws`, what training uses), or else come from ``generator`` (a CPU
    ``torch.Generator``, drawn for the batch as a whole: a video's crop then depends on its
    position in the batch). Returns float in the input's value range (bilinear resampling back to
    ``S``); a video gives the same output whatever the batch it is in.
    """
    if x.dim() != 5:
        raise ValueError(f"expected (B, F, 3, H, W), got {tuple(x.shape)}")
    b, f, c, h, w = x.shape
    if draws is not None:
        if tuple(draws.shape) != (b, AUGMENT_DRAWS):
            raise ValueError(f"draws must be ({b}, {AUGMENT_DRAWS}) for {b} videos, got {tuple(draws.shape)}")
        r = draws.detach().to(device="cpu", dtype=torch.float64)
    elif generator is not None:
        r = torch.rand(b, AUGMENT_DRAWS, generator=generator, dtype=torch.float64)
    else:
        raise ValueError("augment needs draws (augment_draws) or a seeded generator")
    area = scale[0] + (scale[1] - scale[0]) * r[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[:, 1]
    aspect = torch.exp(log_ratio)
    cw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop size as a fraction of the side
    ch = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - cw) * (2 * r[:, 2] - 1)  # crop centre in [-1, 1] coordinates
    cy = (1 - ch) * (2 * r[:, 3] - 1)
    sign = torch.where((r[:, 4] < 0.5) & flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = cw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    theta = theta.to(device=x.device, dtype=torch.float32).repeat_interleave(f, dim=0)
    flat = x.reshape(b * f, c, h, w).float()
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(b, f, c, h, w)


def to_model_input(
    frames: torch.Tensor,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    flip: bool = True,
    preprocess: Preprocess | None = None,
) -> torch.Tensor:
    """Batch of uint8 frames ``(B, F, 3, S, S)`` -> normalised float32 model input, same shape.

    With ``train=True`` and per-video ``draws`` (:func:`augment_draws`) or a ``generator``, applies
    :func:`augment` first; without either no augmentation is done (e.g. when augmentation is
    switched off in the config). ``preprocess``: the backbone's (its mean and std; None: CLIP's).
    """
    if train and (draws is not None or generator is not None):
        frames = augment(frames, generator, draws=draws, scale=scale, flip=flip)
    if preprocess is None:
        return normalize(frames)
    return normalize(frames, preprocess.mean, preprocess.std)
