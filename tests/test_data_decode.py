"""Frame-exact decoding, sampling rule and bad files (vop.data.decode)."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from vop.data.decode import VideoReader, check_video, decode_frames, load_frames, sample_indices, video_info
from vop.data.synth import write_video
from vop.errors import DataError

W, H, BITS = 64, 48, 8


def coded_frames(n: int) -> np.ndarray:
    """Frame i shows the bits of i as 8 big black/white blocks (robust to lossy coding)."""
    out = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                r, c = divmod(b, 4)
                out[i, r * H // 2 : (r + 1) * H // 2, c * W // 4 : (c + 1) * W // 4] = 255
    return out


def read_code(frame: np.ndarray) -> int:
    v = 0
    for b in range(BITS):
        r, c = divmod(b, 4)
        block = frame[r * H // 2 + 4 : (r + 1) * H // 2 - 4, c * W // 4 + 4 : (c + 1) * W // 4 - 4]
        v |= int(block.mean() > 127) << b
    return v


# container, codec, options: sparse keyframes and B-frames wherever the codec has them
CASES = {
    "x264_mp4_gop60_bframes": ("mp4", dict(codec="libx264", lossless=False, gop=60, bframes=3)),
    "x264_mkv_gop60_bframes": ("mkv", dict(codec="libx264", lossless=False, gop=60, bframes=3)),
    "x264_mp4_open_gop": ("mp4", dict(codec="libx264", lossless=False,
                                      options={"x264-params": "threads=1:keyint=50:min-keyint=50:scenecut=0:open-gop=1:bframes=2"})),
    "mpeg4_avi_bframes": ("avi", dict(codec="mpeg4", gop=50, bframes=2)),
    "vp9_webm": ("webm", dict(codec="libvpx-vp9", gop=60)),
}
N = 150


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("coded")
    frames = coded_frames(N)
    out = {}
    for name, (ext, kw) in CASES.items():
        if kw["codec"] not in av.codecs_available:
            continue
        out[name] = write_video(d / f"{name}.{ext}", frames, fps=25, **kw)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_decoded_frames_are_exactly_the_requested_indices(videos, case):
    if case not in videos:
        pytest.skip(f"encoder for {case} not in this PyAV build (av.codecs_available): pip install a PyAV wheel that has it")
    path = videos[case]
    with av.open(str(path)) as c:  # reference: decode everything, in order
        reference = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert [read_code(f) for f in reference] == list(range(N))
    rng = np.random.default_rng(0)
    with VideoReader(path) as v:
        assert v.num_frames == N
        keys = v._key_pos
        assert case == "vp9_webm" or len(keys) >= 3  # several keyframes: restarts really happen
        requests = [sample_indices(N, 12), [N - 1, 0, 59, 60, 61, N - 1], *(rng.integers(0, N, 7) for _ in range(8))]
        for idx in requests:
            frames = v.get(idx)
            assert frames.shape == (len(idx), H, W, 3) and frames.dtype == np.uint8
            assert [read_code(f) for f in frames] == list(idx)
            for f, i in zip(frames, idx):  # pixel-identical to sequential decoding
                assert np.array_equal(f, reference[i])
        for i in range(N):  # each frame on its own (reference, non-reference, before/after keyframes)
            assert np.array_equal(v.get([i])[0], reference[i]), i


def test_sample_indices_rule():
    # test: the frame shown at the centre of each of F equal time segments
    assert sample_indices(120, 12).tolist() == [5, 15, 25, 35, 45, 55, 64, 74, 84, 94, 104, 114]
    assert sample_indices(10, 4).tolist() == [1, 3, 6, 8]  # centres 1.25, 3.75, 6.25, 8.75
    assert sample_indices(16, 8).tolist() == [1, 3, 5, 7, 8, 10, 12, 14]  # ties go towards the middle
    # short video: frames repeat, in order, every frame used
    assert sample_indices(5, 12).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    assert sample_indices(1, 3).tolist() == [0, 0, 0]
    # reversal symmetry: the sampled frames of a reversed video are the reversed sampled frames
    for n in range(1, 80):
        for f in (2, 4, 8, 12, 16, 64):
            idx = sample_indices(n, f)
            assert (n - 1 - idx[::-1]).tolist() == idx.tolist(), (n, f)
            assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() < n
    # train: the frame at a random time inside each segment, seeded
    for gen in (torch.Generator().manual_seed(3), np.random.default_rng(3)):
        idx = sample_indices(100, 10, train=True, generator=gen)
        assert np.all((idx >= np.arange(10) * 10) & (idx < np.arange(1, 11) * 10))
    a = sample_indices(1000, 12, train=True, generator=torch.Generator().manual_seed(1))
    b = sample_indices(1000, 12, train=True, generator=torch.Generator().manual_seed(1))
    c = sample_indices(1000, 12, train=True, generator=torch.Generator().manual_seed(2))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    draws = np.stack([sample_indices(24, 12, train=True, generator=np.random.default_rng(s)) for s in range(200)])
    assert set(np.unique(draws - np.arange(12) * 2).tolist()) == {0, 1}  # both frames of each segment drawn
    with pytest.raises(ValueError):
        sample_indices(10, 4, train=True)  # no generator: not reproducible


def test_load_frames_short_video_and_info(tmp_path):
    path = write_video(tmp_path / "short.mp4", coded_frames(5), fps=10, lossless=False)
    frames, idx = load_frames(path, 12)
    assert frames.shape == (12, H, W, 3)
    assert [read_code(f) for f in frames] == idx.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    info = video_info(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (5, 10.0, W, H)
    assert info.duration == pytest.approx(0.5)
    assert decode_frames(path, [4, 0]).shape == (2, H, W, 3)


def test_edit_list_trimmed_mp4(tmp_path):
    """Packets before an mp4 edit list's start are decoded as references but are not frames."""
    src = write_video(tmp_path / "src.mp4", coded_frames(60), fps=25, lossless=False, gop=20, bframes=2)
    with av.open(str(src)) as inp, av.open(str(tmp_path / "trim.mp4"), "w") as out:
        ist = inp.streams.video[0]
        ost = out.add_stream_from_template(ist)
        shift = round(3 / (25 * ist.time_base))  # 3 frames before time 0: cut by the edit list
        for p in inp.demux(ist):
            if p.dts is not None:
                p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, ost
                out.mux(p)
    for mode in ("seek+skip", "seek", "sequential"):  # sequential: the decoder drops the trimmed frames itself
        with VideoReader(tmp_path / "trim.mp4", mode=mode) as v:
            assert v.num_frames == 57
            assert [read_code(f) for f in v.get([0, 1, 16, 17, 30, 56])] == [3, 4, 19, 20, 33, 59]


def _bad_files(tmp, good):
    data = good.read_bytes()
    faststart = tmp / "faststart.mp4"  # index at the front: the cut keeps it, the frames are gone
    with av.open(str(faststart), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i, f in enumerate(coded_frames(60)):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    files = {
        "truncated": tmp / "truncated.mp4",
        "truncated_faststart": tmp / "truncated_faststart.mp4",
        "empty": tmp / "empty.mp4",
        "text": tmp / "text.mp4",
        "missing": tmp / "missing.mp4",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    fs = faststart.read_bytes()
    files["truncated_faststart"].write_bytes(fs[: len(fs) * 2 // 3])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 50)
    return files


def test_bad_videos_raise_data_error_naming_the_file(tmp_path):
    good = write_video(tmp_path / "good.mp4", coded_frames(60), lossless=False)
    check_video(good)
    for kind, path in _bad_files(tmp_path, good).items():
        with pytest.raises(DataError) as e:
            load_frames(path, 12)
        assert str(path) in str(e.value), kind
        with pytest.raises(DataError):
            check_video(path)
