"""Loading epochs: bad videos are skipped and counted (never zeros), seeded sampling, frame cache."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vop.data import EpochSampler, build_cache, build_loader, get_dataset, verify, write_manifest
from vop.data.synth import write_video

BAD = ["truncated", "empty", "text", "missing"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A collection: 10 good videos (frame i has brightness 20 + 8 i), and 4 bad ones."""
    d = tmp_path_factory.mktemp("collection")
    (d / "v").mkdir()
    rows = []
    for v in range(10):
        n = 20 + v
        frames = np.zeros((n, 32, 32, 3), np.uint8)
        frames[:] = (np.arange(n) * 8 + 20)[:, None, None, None]  # brightness encodes the frame index
        write_video(d / "v" / f"good{v}.mp4", frames)
        rows += [{"video": f"v/good{v}.mp4", "caption": f"video {v} caption {k}", "split": "train"} for k in range(2)]
    data = (d / "v" / "good0.mp4").read_bytes()
    (d / "v" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "v" / "empty.mp4").write_bytes(b"")
    (d / "v" / "text.mp4").write_text("not a video\n" * 20)
    rows += [{"video": f"v/{b}.mp4", "caption": f"bad {b}", "split": "train"} for b in BAD]
    (d / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def frame_index(video: torch.Tensor) -> list[int]:
    """Read back the coded frame indices of a (F, 3, S, S) uint8 video."""
    return ((video.float().mean(dim=(1, 2, 3)) - 20) / 8).round().long().tolist()


def test_bad_videos_skipped_counted_and_never_zero(root, caplog):
    ds = get_dataset("collection", root, "train", frames=4, size=16, missing="keep", manifest=None)
    assert len(ds) == 24 and len(ds.dropped) == 0
    loader = build_loader(ds, batch_size=5, shuffle=True, num_workers=0, seed=0, drop_last=False)
    seen = []
    with caplog.at_level(logging.WARNING, logger="vop.data"):
        for _ in range(2):
            for batch in loader:
                assert batch["video"].dtype == torch.uint8 and batch["video"].shape[1:] == (4, 3, 16, 16)
                assert len(batch["text"]) == batch["video"].shape[0] == len(batch["video_id"])
                assert all(v.startswith("v/good") for v in batch["video_id"])
                assert bool((batch["video"].flatten(1).amax(1) > 0).all())  # never a blank video
                seen += batch["index"].tolist()
    assert sorted(seen) == sorted(list(range(20)) * 2)  # every good pair, both epochs
    assert loader.skipped == 8 and sorted(loader.failures) == sorted(f"v/{b}.mp4" for b in BAD)
    assert all(str(root / v) in f.error for v, f in loader.failures.items())
    # an evaluation set can leave out the videos that failed
    kept = ds.without_videos(loader.failures)
    assert len(kept) == 20 and kept.videos == [f"v/good{v}.mp4" for v in range(10)]
    assert kept.text_to_video.tolist() == [v for v in range(10) for _ in range(2)]
    warned = [r.getMessage() for r in caplog.records if "skipped unreadable video" in r.getMessage()]
    assert len(warned) == 4 and all(any(b in w for b in BAD) for w in warned)  # once per file, named

    # default: missing files are left out when the dataset is built
    assert list(get_dataset("collection", root, "train", manifest=None).dropped) == ["v/missing.mp4"]


def test_worker_processes_give_the_same_seeded_batches(root):
    ds = get_dataset("collection", root, "train", frames=4, size=16, missing="drop", manifest=None, seed=3)

    def run(workers, epochs=2):
        loader = build_loader(ds, batch_size=4, num_workers=workers, seed=7, drop_last=False)
        out = []
        for _ in range(epochs):
            out.append([(b["index"].tolist(), b["frame_indices"].tolist(), b["video"].clone()) for b in loader])
        return out, loader

    (e0, e1), loader0 = run(0)
    (w0, w1), loader2 = run(2)
    assert loader0.skipped == loader2.skipped == 6  # 3 unreadable files (one caption each), two epochs
    for a, b in zip(e0 + e1, w0 + w1):
        assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert [x[0] for x in e0] != [x[0] for x in e1]  # a new order each epoch
    assert [x[1] for x in e0] != [x[1] for x in e1]  # and new random frames
    for idx, frames, video in e0:  # frames really are the sampled ones, one per segment
        for f, v in zip(frames, video):
            assert frame_index(v) == f
    loader0.set_epoch(0)
    assert [b["index"].tolist() for b in loader0] == [x[0] for x in e0]


def test_eval_view_manifest_and_frame_cache(root, tmp_path):
    manifest = write_manifest(verify("collection", root, "train"), tmp_path / "manifest.json")
    test = get_dataset("collection", root, "train", frames=6, size=16, train=False, manifest=manifest)
    assert sorted(test.dropped) == sorted(f"v/{b}.mp4" for b in BAD) and len(test) == 20
    gallery = test.video_dataset()
    assert len(gallery) == len(test.videos) == 10 and not gallery.train
    batches = list(build_loader(gallery, batch_size=4))
    assert torch.cat([b["video_index"] for b in batches]).tolist() == list(range(10))
    first = batches[0]["video"][0]
    assert frame_index(first) == [1, 5, 8, 11, 14, 18]  # frames at the centres 1.67, 5, 8.33, 11.67, 15, 18.33
    assert "text" not in batches[0]

    report = build_cache(test, tmp_path / "cache")
    assert report.written == 10 and not report.failed and build_cache(test, tmp_path / "cache").existing == 10
    cached = get_dataset("collection", root, "train", frames=6, size=16, train=False, manifest=manifest,
                         cache_dir=tmp_path / "cache")
    for i in (0, 5, 19):
        a, b = test[i], cached[i]
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["frame_indices"], b["frame_indices"])


def test_epoch_sampler_shards():
    shards = [list(EpochSampler(10, shuffle=True, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set(sum(shards, [])) == set(range(10))
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_epoch_sampler_drops_the_incomplete_global_batch_on_any_number_of_ranks():
    """15 samples, global batch 8: one batch in one process, and one (not two, one of them padded
    with a repeated sample) on 2 or 4 ranks, holding the same samples."""
    one = list(EpochSampler(15, shuffle=True, seed=2, global_batch=8))
    assert len(one) == len(EpochSampler(15, shuffle=True, seed=2, global_batch=8)) == 8
    for world in (2, 4):
        shards = [EpochSampler(15, shuffle=True, seed=2, rank=r, world_size=world, global_batch=8) for r in range(world)]
        assert all(len(s) == len(list(s)) == 8 // world for s in shards)
        assert sorted(sum((list(s) for s in shards), [])) == sorted(one)
    assert len(EpochSampler(15, shuffle=True, rank=0, world_size=2)) == 8  # without it: padded, 2 batches of 4
    with pytest.raises(ValueError, match="multiple of world_size"):
        EpochSampler(15, shuffle=True, world_size=3, global_batch=8)
