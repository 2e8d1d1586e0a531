"""Training runs and unreadable videos (issue 12): an AV1 world trains with nothing dropped; one broken
video is reported per epoch in the log and in results.json; too many broken videos stop the run
with a clear message (data.max_skipped)."""
from __future__ import annotations

import json
import logging
import shutil

import av
import pytest

from vop.engine.config import RunConfig, load_config
from vop.errors import ConfigError, DataError


def _cfg(root, out, *extra):
    return load_config(RunConfig, None, [
        f"data.root={root}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4",
        "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8",
        "optim.epochs=1", f"out_dir={out}", *extra])


def _to_av1(src, dst):
    """Re-encode with SVT-AV1 (the encoder of the issue's failing files), same frames."""
    with av.open(str(src)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(dst), "w") as c:
        s = c.add_stream("libsvtav1", rate=8)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))


def _copy(world, tmp_path, broken=0):
    root = tmp_path / "world"
    shutil.copytree(world, root)
    for p in sorted((root / "videos" / "train").glob("*.mp4"))[:broken]:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])  # truncated: the mp4 index is lost, cannot be opened
    return root


def test_av1_world_trains_with_nothing_dropped(world, tmp_path):
    from vop.data.decode import VideoReader
    from vop.engine.trainer import train

    if "libsvtav1" not in av.codecs_available:
        pytest.skip("libsvtav1 not in this PyAV build: pip install a PyAV wheel with it")
    root = _copy(world, tmp_path)
    for p in sorted((root / "videos").rglob("*.mp4")):
        _to_av1(p, p.with_suffix(".tmp.mp4"))
        p.with_suffix(".tmp.mp4").replace(p)
    with VideoReader(next((root / "videos" / "train").glob("*.mp4"))) as v:
        assert v.codec == "libdav1d" and v.mode == "seek"
    res = train(_cfg(root, tmp_path / "run"), progress=False)
    assert res["history"][0]["skipped"] == {"videos": 0, "samples": 0, "attempted": 48, "missing_videos": 0,
                                            "missing_samples": 0, "fraction": 0.0, "ids": []}
    assert res["skipped"]["videos"] == 0 and res["skipped"]["message"] == "0 videos skipped"
    assert res["last"]["test"]["skipped_videos"] == 0 and res["last"]["test"]["videos"] == 16


def test_one_broken_video_is_reported(world, tmp_path, caplog):
    from vop.engine.trainer import train

    root = _copy(world, tmp_path, broken=1)
    # 1 of the smoke world's 16 training videos is 3 of 48 samples (6.25%): above the default 1%
    with caplog.at_level(logging.INFO):
        res = train(_cfg(root, tmp_path / "run", "optim.epochs=2", "data.max_skipped=0.1"), progress=False)
    text = caplog.text
    assert "epoch 1: 1 video skipped (3 of 48 samples, 6.2%)" in text and "epoch 2: 1 video skipped" in text
    assert "1 video skipped in training (videos/train/train00000.mp4; samples lost per epoch: 3, 3)" in text
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["skipped"]["videos"] == 1 and saved["skipped"]["ids"] == ["videos/train/train00000.mp4"]
    assert saved["skipped"]["message"].startswith("1 video skipped")
    assert saved["skipped"]["samples_per_epoch"] == [3, 3]
    assert [h["skipped"]["samples"] for h in saved["history"]] == [3, 3]
    assert "train00000.mp4" in saved["skipped"]["errors"]["videos/train/train00000.mp4"]
    assert res["skipped"] == saved["skipped"]


def test_ten_percent_broken_fails_clearly(world, tmp_path, capsys):
    from vop.cli.main import main

    root = _copy(world, tmp_path, broken=2)  # 2 of 16 videos, 6 of 48 samples
    rc = main(["train", "-q", f"data.root={root}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4",
               "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "optim.epochs=1",
               f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "epoch 1: 12.5% of the training samples were lost, more than data.max_skipped=0.01 allows: " \
           "2 videos skipped (6 of 48 samples)" in err
    assert "train00000.mp4" in err and "vop data verify --dataset collection" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_max_skipped_is_range_checked(world, tmp_path):
    with pytest.raises(ConfigError, match=r"'data.max_skipped' must be in \[0, 1\]"):
        _cfg(world, tmp_path, "data.max_skipped=1.5")
    assert _cfg(world, tmp_path).data.max_skipped == 0.01


def test_missing_files_over_the_limit_fail_before_training(world, tmp_path):
    from vop.engine.trainer import train

    root = _copy(world, tmp_path)
    for p in sorted((root / "videos" / "train").glob("*.mp4"))[:2]:
        p.unlink()
    with pytest.raises(DataError, match="lost 6 of 48 samples .* to 2 missing video files"):
        train(_cfg(root, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "state.pt").exists()
