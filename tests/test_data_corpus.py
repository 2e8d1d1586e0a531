"""A corpus of what users really have (issue 12): AV1, HEVC, VP9, H.264 with B-frames, variable
frame rate, rotated phone video, cover-art streams, concatenated MPEG-2 program streams, MPEG-TS,
a raw H.264 stream without timestamps.

Every frame carries its index in its pixels (``coded_frames``/``read_code`` of test_data_decode),
so a wrong frame, a lost frame or a wrong orientation is seen. Built once per module with PyAV;
the cases made with the ``ffmpeg`` command line (libaom AV1, ffmpeg's own cover-art muxing, its
autorotation as a reference) are skipped with an install hint when it is missing.
"""
from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from test_data_decode import H, W, coded_frames, read_code
from vop.data.decode import MODES, VideoReader, check_video, load_frames, sample_indices
from vop.data.synth import write_video
from vop.errors import DataError

N = 60  # frames per clip (2.4 s at 25 fps); keyframes every 20 where the encoder takes it
FFMPEG = shutil.which("ffmpeg")
NO_FFMPEG = "the ffmpeg command line is not installed: apt-get install -y ffmpeg"


def _write(path: Path, frames: np.ndarray, codec: str, *, fmt: str | None = None, rate=25, pts=None,
           time_base=None, options=None, rotation=None, pix_fmt="yuv420p", gop=20, bframes=None) -> Path:
    """Encode with PyAV; ``pts`` (with ``time_base``) for variable frame rate; ``rotation``:
    (counter-clockwise degrees, hflip) written as the display matrix."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = pix_fmt
        s.codec_context.thread_count = 1
        if gop:
            s.codec_context.gop_size = gop
        if bframes is not None:
            s.codec_context.max_b_frames = bframes
        if time_base is not None:
            s.codec_context.time_base = s.time_base = time_base
        s.options = dict(options or {})
        if rotation is not None:
            s.set_display_rotation(rotation[0], hflip=rotation[1])
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i if pts is None else pts[i]
            if time_base is not None:
                vf.time_base = time_base
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


def _cover_mkv(path: Path, frames: np.ndarray) -> Path:
    """Matroska whose FIRST video stream is a one-frame JPEG cover, bigger than the video, no flags."""
    cover = np.full((120, 160, 3), 200, np.uint8)
    with av.open(str(path), "w") as c:
        pic = c.add_stream("mjpeg", rate=1)
        pic.width, pic.height, pic.pix_fmt = 160, 120, "yuvj420p"
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"x264-params": "threads=1:keyint=20:min-keyint=20:bframes=2"}
        vf = av.VideoFrame.from_ndarray(cover, format="rgb24")
        vf.pts = 0
        c.mux(pic.encode(vf))
        c.mux(pic.encode(None))
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


def _concatenated_ps(d: Path, frames: np.ndarray) -> Path:
    """Two MPEG-2 program streams (as VOB parts of a DVD) joined byte by byte: the timestamps of
    the second part start again at the first part's, so many frames share a timestamp."""
    half = len(frames) // 2
    parts = [_write(d / f"part{k}.mpg", frames[k * half:(k + 1) * half], "mpeg2video", fmt="vob", gop=12, bframes=2,
                    options={"b": "800k"}) for k in range(2)]
    out = d / "concatenated_mpeg2.vob"
    out.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
    return out


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True, timeout=120)


# name -> (expected orientation (ccw degrees, mirrored), needs the ffmpeg CLI)
CASES = {
    "av1_svt_mp4": ((0, False), False),
    "av1_svt_default_mkv": ((0, False), False),
    "av1_libaom_mp4": ((0, False), True),
    "hevc_x265_bframes_mp4": ((0, False), False),
    "vp9_altref_webm": ((0, False), False),
    "h264_bpyramid_mp4": ((0, False), False),
    "h264_vfr_mkv": ((0, False), False),
    "h264_rotated90_mp4": ((90, False), False),
    "h264_rotated270_mirrored_mov": ((270, True), False),
    "cover_first_mkv": ((0, False), False),
    "cover_ffmpeg_mkv": ((0, False), True),
    "cover_ffmpeg_mp4": ((0, False), True),
    "mpeg2_concatenated_vob": ((0, False), False),
    "mpeg2_ts": ((0, False), False),
    "h264_raw_no_timestamps": ((0, False), False),
}


def _displayed_to_stored(frames: np.ndarray, rot: int, mirrored: bool) -> np.ndarray:
    """What to encode so that a player showing it with (rot, mirrored) shows ``frames``."""
    if mirrored:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(frames, -rot // 90, axes=(1, 2)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    fr = coded_frames(N)
    x264 = {"x264-params": "threads=1:keyint=20:min-keyint=20:scenecut=0:bframes=3:b-pyramid=normal"}
    x265 = {"x265-params": "keyint=20:min-keyint=20:bframes=3:pools=1:frame-threads=1:log-level=error"}
    out: dict[str, Path] = {}
    out["av1_svt_mp4"] = _write(d / "av1_svt.mp4", fr, "libsvtav1", gop=20)
    out["av1_svt_default_mkv"] = _write(d / "av1_svt_default.mkv", fr, "libsvtav1", gop=None)
    out["hevc_x265_bframes_mp4"] = _write(d / "hevc.mp4", fr, "libx265", options=x265)
    out["vp9_altref_webm"] = _write(d / "vp9.webm", fr, "libvpx-vp9", options={"auto-alt-ref": "1", "lag-in-frames": "16"})
    out["h264_bpyramid_mp4"] = _write(d / "h264.mp4", fr, "libx264", options=x264)
    rng = np.random.default_rng(0)  # 10 to 90 ms between frames
    vfr = np.cumsum(np.concatenate([[0], rng.integers(10, 90, N - 1)]))
    out["h264_vfr_mkv"] = _write(d / "vfr.mkv", fr, "libx264", options=x264, pts=vfr.tolist(), time_base=Fraction(1, 1000))
    out["h264_rotated90_mp4"] = _write(d / "rot90.mp4", _displayed_to_stored(fr, 90, False), "libx264", options=x264,
                                       rotation=(90, False))
    out["h264_rotated270_mirrored_mov"] = _write(d / "rot270m.mov", _displayed_to_stored(fr, 270, True), "libx264",
                                                 options=x264, rotation=(270, True))  # (x265 crashes on 48 px wide)
    out["cover_first_mkv"] = _cover_mkv(d / "cover.mkv", fr)
    out["mpeg2_concatenated_vob"] = _concatenated_ps(d, fr)
    out["mpeg2_ts"] = _write(d / "mpeg2.ts", fr, "mpeg2video", fmt="mpegts", gop=12, bframes=2, options={"b": "800k"})
    out["h264_raw_no_timestamps"] = _write(d / "raw.h264", fr, "libx264", fmt="h264", options=x264)  # Annex B: no pts
    if FFMPEG:
        src = write_video(d / "src.mkv", fr, fps=25)  # lossless x264: the input of the ffmpeg-made files
        if "libaom-av1" in subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout:
            _ffmpeg("-i", str(src), "-c:v", "libaom-av1", "-cpu-used", "8", "-row-mt", "0", "-threads", "1",
                    "-g", "20", "-crf", "30", str(d / "av1_aom.mp4"))
            out["av1_libaom_mp4"] = d / "av1_aom.mp4"
        png = d / "cover.png"
        _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=160x120", "-frames:v", "1", str(png))
        h264 = out["h264_bpyramid_mp4"]
        _ffmpeg("-i", str(png), "-i", str(h264), "-map", "0", "-map", "1", "-c", "copy", "-disposition:v:0", "attached_pic",
                str(d / "cover_ff.mkv"))
        _ffmpeg("-i", str(png), "-i", str(h264), "-map", "0", "-map", "1", "-c", "copy", "-disposition:v:0", "attached_pic",
                str(d / "cover_ff.mp4"))
        out["cover_ffmpeg_mkv"], out["cover_ffmpeg_mp4"] = d / "cover_ff.mkv", d / "cover_ff.mp4"
    return out


def _case(corpus, case):
    if case not in corpus:
        if CASES[case][1] and not FFMPEG:
            pytest.skip(NO_FFMPEG)
        pytest.skip(f"{case}: encoder not in this ffmpeg build (ffmpeg -encoders)")
    return corpus[case]


def _reference(path: Path, rot: int, mirrored: bool) -> list[np.ndarray]:
    """Every frame in decoder output order (what ffmpeg shows), oriented by hand."""
    with av.open(str(path)) as c:
        s = max(c.streams.video, key=lambda s: s.codec_context.width != 160)  # not the cover
        out = []
        for f in c.decode(s):
            x = np.rot90(f.to_ndarray(format="rgb24"), rot // 90)
            out.append(np.ascontiguousarray(x[:, ::-1] if mirrored else x))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_frames_are_the_requested_ones(corpus, case):
    path = _case(corpus, case)
    (rot, mirrored), _ = CASES[case]
    reference = _reference(path, rot, mirrored)
    assert [read_code(f) for f in reference] == list(range(N)), "the corpus file itself"
    with VideoReader(path) as v:
        info = v.info
        assert (info.num_frames, info.width, info.height) == (N, W, H)
        assert (info.rotation, info.mirrored) == (rot, mirrored)
        idx = sample_indices(N, 12)
        frames = v.get(idx)
        assert frames.shape == (12, H, W, 3)
        assert [read_code(f) for f in frames] == idx.tolist()
        for f, i in zip(frames, idx):
            assert np.array_equal(f, reference[i])  # pixel-identical to decoding everything in order
        rng = np.random.default_rng(0)
        for _ in range(20):  # train draws never fail, and are the frames asked for
            idx = sample_indices(N, 12, train=True, generator=rng)
            assert [read_code(f) for f in v.get(idx)] == idx.tolist()
        for i in range(N):  # each frame on its own: every restart point and frame type
            assert np.array_equal(v.get([i])[0], reference[i]), i
    check_video(path)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_same_frames(corpus, mode):
    """The fast path, decoding every packet, and plain sequential decoding agree on every case."""
    idx = [N - 1, 0, 17, 20, 21, 40, 59, 33]
    for case, path in corpus.items():
        auto = VideoReader(path).mode
        if (mode == "seek+skip" and auto != "seek+skip") or (mode != "sequential" and auto == "sequential"):
            continue  # not offered for that decoder, or no timestamps to seek by
        with VideoReader(path, mode=mode) as v:
            assert v.num_frames == N, case
            assert [read_code(f) for f in v.get(idx)] == idx, (case, mode)


def test_mode_chosen_per_decoder(corpus):
    modes = {case: VideoReader(p).info.mode for case, p in corpus.items()}
    assert modes["av1_svt_mp4"] == modes["av1_svt_default_mkv"] == "seek"  # dav1d: no per-packet skipping
    assert modes["h264_bpyramid_mp4"] == modes["hevc_x265_bframes_mp4"] == modes["mpeg2_concatenated_vob"] == "seek+skip"
    assert modes["h264_raw_no_timestamps"] == "sequential"  # frames numbered in the decoder's output order


def test_the_video_stream_ffmpeg_would_pick(corpus):
    info = VideoReader(corpus["cover_first_mkv"]).info
    assert info.stream == 1 and info.codec == "h264"  # not the (first, larger) cover
    with av.open(str(corpus["cover_first_mkv"])) as c:
        assert c.streams.best("video").index == 1  # av_find_best_stream agrees


@pytest.mark.skipif(not FFMPEG, reason=NO_FFMPEG)
def test_orientation_matches_ffmpeg_autorotate(corpus):
    """The ffmpeg command line (autorotate on) shows the same picture, frame for frame."""
    for case in ("h264_rotated90_mp4", "h264_rotated270_mirrored_mov"):
        raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(corpus[case]), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                             capture_output=True, check=True, timeout=60).stdout
        cli = np.frombuffer(raw, np.uint8).reshape(N, H, W, 3)
        assert [read_code(f) for f in cli] == list(range(N)), case
        ours, _ = load_frames(corpus[case], 12)
        assert np.abs(ours.astype(int) - cli[sample_indices(N, 12)].astype(int)).mean() < 3, case


def test_truncated_webm_is_refused(corpus, tmp_path):
    data = corpus["vp9_altref_webm"].read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as e:
        VideoReader(cut)
    assert str(cut) in str(e.value)
    with pytest.raises(DataError, match="truncated"):
        check_video(cut)
