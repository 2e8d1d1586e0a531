"""Batched pixel transforms: resize + centre crop, CLIP normalisation, seeded augmentation."""
from __future__ import annotations

import numpy as np
import pytest
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


def test_augment_draws_follow_the_sample_not_its_batch_position_or_rank():
    """Training augmentation is keyed on (seed, epoch, sample index): the crop and flip of a sample are
    the same in one process and on either rank of two, and samples at the same position of the two
    ranks' batches get different ones (one generator per batch gave them the same)."""
    from vop.data import EpochSampler, augment_draws

    n, batch, seed, epoch = 16, 8, 3, 1
    videos = torch.randint(0, 256, (n, 2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def run(rank: int, world: int) -> dict[int, torch.Tensor]:
        sampler = EpochSampler(n, shuffle=True, seed=seed, rank=rank, world_size=world, global_batch=batch)
        sampler.set_epoch(epoch)
        order, per = list(sampler), batch // world
        out = {}
        for k in range(0, len(order), per):  # what the trainer does with each of this rank's batches
            idx = torch.tensor(order[k:k + per])
            x = to_model_input(videos[idx], train=True, draws=augment_draws(seed, epoch, idx))
            out.update({int(i): v for i, v in zip(idx, x)})
        return out

    one = run(0, 1)
    two = {**run(0, 2), **run(1, 2)}
    assert sorted(one) == sorted(two) == list(range(n))
    for i in range(n):
        assert torch.allclose(one[i], two[i], atol=1e-6), i
    plain = normalize(videos)
    assert all(not torch.allclose(one[i], plain[i], atol=1e-3) for i in range(n))  # augmentation is on
    # rows depend only on (seed, epoch, index): order and company do not matter, seed and epoch do
    d = augment_draws(seed, epoch, [5, 9, 2])
    assert d.shape == (3, 5) and d.dtype == torch.float64 and bool(((d >= 0) & (d < 1)).all())
    assert torch.equal(augment_draws(seed, epoch, torch.tensor([2, 5])), d[[2, 0]])
    assert torch.equal(augment_draws(seed, epoch, np.array([9])), d[[1]])
    assert not torch.equal(augment_draws(seed, epoch + 1, [5]), d[:1])
    assert not torch.equal(augment_draws(seed + 1, epoch, [5]), d[:1])
    assert len({tuple(r) for r in augment_draws(seed, epoch, range(64)).tolist()}) == 64  # one draw per sample
    # a stream of its own, not the frame sampler's numbers for the same (seed, epoch, index)
    assert not np.allclose(np.random.default_rng([seed, epoch, 5]).random(5), d[0].numpy())
    # a video's output does not depend on its position in the batch
    x = videos[:4]
    draws = augment_draws(seed, epoch, [0, 1, 2, 3])
    perm = [2, 0, 3, 1]
    assert torch.allclose(augment(x[perm], draws=draws[perm]), augment(x, draws=draws)[perm], atol=1e-6)
    with pytest.raises(ValueError, match="draws must be"):
        augment(x, draws=draws[:2])
    with pytest.raises(ValueError, match="draws .* or a seeded generator"):
        augment(x)
