"""Folder walks (issue 12): cycle-safe, links to folders followed, the same extensions for the dataset
finder, `vop data verify` and `vop index`, everything left out listed with its reason; and
`vop data verify` decodes the frames training reads, not only the first and last."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import vop
from test_data_decode import coded_frames
from vop.cli.data import register
from vop.data.decode import VideoReader, check_video
from vop.data.files import VIDEO_EXTS, walk_videos
from vop.data.synth import write_video
from vop.errors import DataError


def _clip(path: Path, fmt: str | None = None, seed: int = 0) -> Path:
    """A 6-frame 32x32 clip; ``fmt`` forces the container (an .mts file is an MPEG-TS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    if fmt is None:
        return write_video(path, frames, lossless=False)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.options = {"x264-params": "threads=1"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


@pytest.fixture
def tree(tmp_path):
    """videos/ with camcorder files, a link loop, a linked outside folder, a broken link, a hidden
    resource file and a text file."""
    v = tmp_path / "videos"
    _clip(v / "a.mp4")
    _clip(v / "cam" / "00001.mts", "mpegts", 1)
    _clip(v / "cam" / "00002.m2ts", "mpegts", 2)
    _clip(v / "cam" / "tv.ts", "mpegts", 3)
    _clip(tmp_path / "elsewhere" / "b.mkv", seed=4)
    os.symlink(tmp_path / "elsewhere", v / "linked")  # a symlinked folder: followed
    os.symlink(v, v / "cam" / "loop")  # a cycle: cam/loop -> videos
    os.symlink(tmp_path / "nowhere.mp4", v / "dangling.mp4")
    (v / "._a.mp4").write_bytes(b"\0" * 100)  # macOS resource fork: not a video
    (v / "notes.txt").write_text("x")
    return tmp_path


def test_walk_is_cycle_safe_follows_links_and_says_what_it_left_out(tree):
    w = walk_videos(tree / "videos")
    rel = [p.relative_to(tree / "videos").as_posix() for p in w.files]
    assert rel == ["a.mp4", "cam/00001.mts", "cam/00002.m2ts", "cam/tv.ts", "linked/b.mkv"]
    why = {p.relative_to(tree / "videos").as_posix(): r for p, r in w.skipped}
    assert why["cam/loop"].startswith("folder already listed as") and "link cycle" in why["cam/loop"]
    assert why["dangling.mp4"] == "broken link"
    assert why["._a.mp4"].startswith("hidden")
    assert why["notes.txt"] == "not a video extension (.txt)"
    assert {".mts", ".m2ts", ".ts"} <= set(VIDEO_EXTS)


def test_index_lists_camcorder_files_and_linked_folders(tree, tmp_path):
    from vop.retrieval import build_index, list_sources

    skipped: dict[str, str] = {}
    sources, _ = list_sources(tree / "videos", skipped=skipped)
    assert [s.id for s in sources] == ["a.mp4", "cam/00001.mts", "cam/00002.m2ts", "cam/tv.ts", "linked/b.mkv"]
    assert "link cycle" in skipped[str(tree / "videos" / "cam" / "loop")]
    torch.manual_seed(0)
    ckpt = vop.save_checkpoint(vop.create_model("vop-fc", "tiny", frames=4), tmp_path / "c.safetensors",
                               extra={"backbone": "tiny"})
    r = build_index(tree / "videos", ckpt, tmp_path / "ix", image_size=32, progress=False)
    assert (r.total, r.failed) == (5, {})
    assert set(r.skipped) == {str(tree / "videos" / n) for n in ("cam/loop", "dangling.mp4", "._a.mp4", "notes.txt")}


def _run(fn, timeout=120):
    """fn() in a daemon thread: a hang fails the test instead of blocking the suite."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung (folder walk cycle?)"
    return out["r"]


def test_verify_msrvtt_with_a_link_loop_finishes_and_lists_it(tree):
    root = tree
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr0,a,a clip\nret1,msr1,00001,a camcorder clip\nret2,msr2,b,linked\n"
        "ret3,msr3,gone,missing\n")
    app = typer.Typer()
    register(app)
    r = _run(lambda: CliRunner().invoke(app, ["data", "verify", "-d", "msrvtt", "-r", str(root), "--frames", "4"]))
    assert r.exit_code == 0, r.output
    assert "msrvtt test: 4 samples, 4 videos, 1 missing, 0 undecodable" in r.output
    assert "link cycle" in r.output and "broken link" in r.output  # what the walk left out, and why
    m = json.loads((root / "vop-verify-msrvtt-test.json").read_text())
    assert m["frames"] == 4 and {Path(s["path"]).name for s in m["skipped"]} >= {"loop", "dangling.mp4"}
    ds = vop.data.get_dataset("msrvtt", root, "test", frames=4, size=16)  # the same finder: .mts found by stem
    assert ds.video_paths[1] == root / "videos" / "cam" / "00001.mts"


def test_verify_decodes_the_frames_training_reads(tmp_path):
    """A file whose middle is damaged but whose first and last frames decode: the old check (first
    and last frame) passed it; the sampled frames do not decode."""
    path = write_video(tmp_path / "mid.mp4", coded_frames(60), fps=25, lossless=False, gop=20)
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as c:
        spans = [(p.pos, p.size) for k, p in enumerate(c.demux(video=0)) if 25 <= k <= 35 and p.size]
    rng = np.random.default_rng(0)
    for pos, size in spans:
        data[pos + 2: pos + size] = rng.integers(0, 256, size - 2, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with VideoReader(path) as v:
        assert v.get([0, 59]).shape[0] == 2  # what `vop data verify` used to check
    with pytest.raises(DataError, match="mid.mp4"):
        check_video(path)
