"""Batched pixel transforms: resize + centre crop, CLIP normalisation, seeded augmentation."""
from __future__ import annotations

import torch

from vop.data.transforms import CLIP_MEAN, CLIP_STD, augment, normalize, resize_center_crop, to_model_input


def test_resize_center_crop_keeps_the_centre_and_shapes():
    # 2 videos x 3 frames of 40x80 (H x W): left quarter red, centre green, right quarter blue
    x = torch.zeros(2, 3, 3, 40, 80, dtype=torch.uint8)
    x[..., 0, :, :20] = 255
    x[..., 1, :, 20:60] = 255
    x[..., 2, :, 60:] = 255
    y = resize_center_crop(x, 20)  # short side 40 -> 20, width 80 -> 40, crop the middle 20
    assert y.shape == (2, 3, 3, 20, 20) and y.dtype == torch.uint8
    inner = y[..., 2:-2]  # away from the colour edges that bicubic blends
    assert torch.all(inner[..., 1, :, :] == 255) and torch.all(inner[..., 0, :, :] == 0) and torch.all(inner[..., 2, :, :] == 0)
    flat = torch.full((4, 3, 30, 50), 77, dtype=torch.uint8)  # a flat image stays flat (antialiased bicubic)
    assert torch.all(resize_center_crop(flat, 16) == 77)
    same = torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(resize_center_crop(same, 16), same)
    f = resize_center_crop(flat.float(), 16)
    assert f.dtype == torch.float32 and torch.allclose(f, torch.tensor(77.0), atol=1e-3)


def test_normalize_matches_clip_constants():
    x = torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8)
    x[:, :, :, :2] = 255
    y = normalize(x)
    for c in range(3):
        assert torch.allclose(y[:, :, c, :2], torch.tensor((1 - CLIP_MEAN[c]) / CLIP_STD[c]))
        assert torch.allclose(y[:, :, c, 2:], torch.tensor(-CLIP_MEAN[c] / CLIP_STD[c]))


def test_augment_is_seeded_and_shared_by_the_frames_of_a_video():
    base = torch.randint(0, 256, (1, 1, 3, 32, 32), dtype=torch.uint8)
    x = base.expand(4, 5, 3, 32, 32).contiguous()  # 4 videos, 5 identical frames each
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a[:, :1].expand_as(a))  # every frame of a video gets the same crop/flip
    assert not torch.equal(a[0], a[1])  # videos get different crops
    # scale 1 and no flip: identity (up to resampling at pixel centres)
    ident = augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(ident, x.float(), atol=1e-3)
    flipped = augment(x[:1], torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(flipped, x[:1].float(), atol=1e-3) or torch.allclose(flipped, x[:1].float().flip(-1), atol=1e-3)
    out = to_model_input(x, train=True, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.allclose(out, normalize(a))
    assert torch.allclose(to_model_input(x), normalize(x))
