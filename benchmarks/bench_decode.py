"""Decode throughput: our frame-exact sampler vs decode-everything vs OpenCV per-frame seeking.

    python benchmarks/bench_decode.py [--repeats 20] [--workers 0 1 2] [--no-synthetic]

Generates (in a temp dir) 10 s, 30 fps, 320x240 clips whose frames carry their own index in big
black/white blocks (h264; AV1 by SVT-AV1; and an h264 clip stored sideways with a 90 degree display
matrix, as phones write them), then times, for the 12 test-sampled frames of a clip:

- ``ours``        ``vop.data.load_frames`` (demux once, decode from the keyframe before each
                  needed frame, convert only the 12 frames to RGB);
- ``decode_all``  decode every frame and convert every frame to RGB, then pick 12 (as DGL does);
- ``decode_all_pick`` decode every frame, convert only the 12 (decoding cost alone);
- ``opencv_seek`` ``cv2.VideoCapture`` + ``CAP_PROP_POS_FRAMES`` seek per frame (as X-Pool does),
                  skipped with a note when cv2 is not importable.

It also reads back each method's frame indices from the pixels (as displayed) and reports how many
are wrong. Then the decoding modes of ``VideoReader`` on one clip each (``seek+skip``: the fast path;
``seek``: every packet decoded, the exact path for decoders where skipping is unsafe, e.g. dav1d;
``sequential``: decode from the start, for files without usable timestamps), and ``check_video``
(what ``vop data verify`` decodes per video: first, last, 12 test-sampled frames, a train draw).
Clips: natural-looking content (smooth moving gradients and discs, light noise) with a keyframe
every second (``gop30``, common for web video) or x264's default maximum interval of 250 frames
(``gop250``); and a high-detail shifting noise texture (decoding dominates: the worst case).
Then loader throughput: videos/s through ``build_loader`` with N worker processes (12 frames,
224 px), and on the synthetic world (``small``; its generation time too). All decoders run
single-threaded (thread_count=1; OpenCV uses its own defaults). Times are medians over the repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from vop.data import build_loader, get_dataset, load_frames, sample_indices
from vop.data.decode import MODES, VideoReader, check_video
from vop.data.synth import write_video

W, H, FPS, SECONDS, F = 320, 240, 30, 10, 12


def _encode(path: Path, frames: np.ndarray, codec: str, gop: int, rotation: int | None = None) -> Path:
    """PyAV encoder for the AV1 and rotated clips (``rotation``: display matrix, counter-clockwise)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.codec_context.thread_count = 1
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.options = {"x264-params": f"threads=1:keyint={gop}:min-keyint={min(gop, 25)}:bframes=3"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


def make_clip(path: Path, gop: int, content: str = "natural", seed: int = 0, codec: str = "libx264",
              rotated: bool = False) -> Path:
    """``natural``: smooth moving gradients, moving discs, light sensor noise; ``noise``: a
    shifting random texture (high detail: decoding dominates, the hardest case for a sampler)."""
    n = FPS * SECONDS
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    grain = rng.normal(0, 4, (H, W * 2, 3)).astype(np.float32)
    texture = rng.integers(0, 255, (H, W * 2, 3), dtype=np.uint8)
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        if content == "noise":
            frames[i] = texture[:, (i * 3) % W : (i * 3) % W + W]
        else:
            f = np.stack([128 + 60 * np.sin((xx + 2 * i) / 40), 128 + 60 * np.cos((yy + i) / 30),
                          128 + 50 * np.sin((xx + yy - 3 * i) / 50)], -1)
            for k in range(5):
                cx, cy = (40 + k * 60 + i * (k + 1)) % W, (60 + k * 30 + int(40 * np.sin(i / 20 + k))) % H
                f[(xx - cx) ** 2 + (yy - cy) ** 2 < (15 + 3 * k) ** 2] = ((50 * k) % 255, 200 - 30 * k, 40 * k)
            frames[i] = np.clip(f + grain[:, (i * 2) % W : (i * 2) % W + W], 0, 255).astype(np.uint8)
        for b in range(9):  # the frame index, in 9 blocks of 32x32 across the top
            frames[i, :32, b * 32 : (b + 1) * 32] = 255 if (i >> b) & 1 else 0
    if rotated:  # stored sideways, shown upright by a 90 degree display matrix
        return _encode(path, np.rot90(frames, -1, axes=(1, 2)), codec, gop, rotation=90)
    if codec != "libx264":
        return _encode(path, frames, codec, gop)
    opts = {"x264-params": f"threads=1:keyint={gop}:min-keyint={min(gop, 25)}:bframes=3"}
    return write_video(path, frames, FPS, lossless=False, options=opts)


def read_index(rgb: np.ndarray) -> int:
    return sum(int(rgb[8:24, b * 32 + 8 : b * 32 + 24].mean() > 127) << b for b in range(9))


def ours(path: Path) -> list[np.ndarray]:
    frames, _ = load_frames(path, F)
    return list(frames)


def _decode_all(path: Path, convert_all: bool) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        if convert_all:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
            idx = sample_indices(len(frames), F)
            return [frames[i] for i in idx]
        raw = list(c.decode(s))
        idx = sample_indices(len(raw), F)
        return [raw[i].to_ndarray(format="rgb24") for i in idx]


def decode_all(path: Path) -> list[np.ndarray]:
    return _decode_all(path, True)


def decode_all_pick(path: Path) -> list[np.ndarray]:
    return _decode_all(path, False)


def opencv_seek(path: Path) -> list[np.ndarray]:
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # its FFmpeg's per-frame complaints (no AV1 decoder)
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    out = []
    for i in sample_indices(n, F):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        ok, frame = cap.read()
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if ok else np.zeros((H, W, 3), np.uint8))
    cap.release()
    return out


def time_method(fn, path: Path, repeats: int) -> tuple[float, int]:
    """Median seconds per call over ``repeats`` calls (robust to other jobs on the machine), and
    how many of the returned frames are not the requested ones."""
    fn(path)  # warm-up (page cache, library init)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        frames = fn(path)
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    expected = sample_indices(FPS * SECONDS, F).tolist()
    wrong = sum(f.shape[:2] != (H, W) or read_index(f) != e for f, e in zip(frames, expected))
    return dt, wrong


CLIPS = {  # name: (content, keyframe interval, codec, rotated)
    "natural_gop30": ("natural", 30, "libx264", False),
    "natural_gop250": ("natural", 250, "libx264", False),
    "noise_gop30": ("noise", 30, "libx264", False),
    "av1_natural_gop30": ("natural", 30, "libsvtav1", False),
    "rotated90_natural_gop30": ("natural", 30, "libx264", True),
}


def clip(tmp: Path, name: str) -> Path:
    content, gop, codec, rotated = CLIPS[name]
    path = tmp / f"clip_{name}.mp4"
    return path if path.exists() else make_clip(path, gop, content, codec=codec, rotated=rotated)


def bench_decode(tmp: Path, repeats: int) -> dict:
    methods = {"ours": ours, "decode_all": decode_all, "decode_all_pick": decode_all_pick}
    try:
        import cv2  # noqa: F401

        methods["opencv_seek"] = opencv_seek
    except ImportError:
        print("note: cv2 not importable, OpenCV seeking skipped (pip install opencv-python-headless)")
    results = {}
    for name, (content, gop, codec, rotated) in CLIPS.items():
        if codec not in av.codecs_available:
            print(f"note: {codec} not in this PyAV build, clip {name} skipped")
            continue
        path = clip(tmp, name)
        rows = {m: time_method(fn, path, repeats) for m, fn in methods.items()}
        base = rows["ours"][0]
        with VideoReader(path) as v:
            mode = v.mode
        print(f"\n10 s 30 fps 320x240 {codec} ({content}{', rotated 90' if rotated else ''}, "
              f"{path.stat().st_size // 1024} KiB), keyframe interval {'<=' if gop == 250 else ''}{gop}, "
              f"{F} test-sampled frames (ours: mode {mode}):")
        print(f"  {'method':<16} {'ms/video':>9} {'videos/s':>9} {'vs ours':>8} {'wrong frames':>13}")
        for m, (dt, wrong) in rows.items():
            print(f"  {m:<16} {dt * 1e3:9.1f} {1 / dt:9.1f} {dt / base:7.2f}x {wrong:>8}/{F}")
        results[name] = {k: {"ms": round(v[0] * 1e3, 2), "wrong": v[1]} for k, v in rows.items()}
        results[name]["mode"] = mode
    return results


def verify_one(path: Path) -> list:
    check_video(path)  # what `vop data verify` decodes per video (first, last, 12 test-sampled, a train draw)
    return []


def bench_modes(tmp: Path, repeats: int) -> dict:
    """Each decoding mode forced on the same clips: the cost of the exact fallbacks; and check_video."""
    out: dict = {}
    print(f"\ndecoding modes ({F} test-sampled frames, ms/video) and check_video (vop data verify, ms/video):")
    for name in ("natural_gop30", "av1_natural_gop30"):
        if CLIPS[name][2] not in av.codecs_available:
            continue
        path = clip(tmp, name)
        row = {}
        for mode in MODES:
            with VideoReader(path) as v:
                if mode == "seek+skip" and v.mode != "seek+skip":
                    continue  # not offered for this decoder (dav1d)

            def fn(p, mode=mode):
                with VideoReader(p, mode=mode) as r:
                    return list(r.get(sample_indices(r.num_frames, F)))

            row[mode] = time_method(fn, path, repeats)
        row["check_video"] = time_method(verify_one, path, repeats)
        print(f"  {name:<20} " + "  ".join(f"{k} {v[0] * 1e3:.1f} ({v[1]} wrong)" if k != "check_video"
                                          else f"{k} {v[0] * 1e3:.1f}" for k, v in row.items()))
        out[name] = {k: {"ms": round(v[0] * 1e3, 2), "wrong": v[1]} for k, v in row.items()}
    return out


def bench_loader(tmp: Path, workers: list[int], videos: int = 48) -> dict:
    clips = [make_clip(tmp / f"l{i}.mp4", 30, seed=i) for i in range(4)]  # natural content
    rows = [{"video": c.name, "caption": f"clip {k}"} for k in range(videos) for c in clips[k % 4 : k % 4 + 1]]
    (tmp / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\nloader: {videos} videos (10 s 320x240, gop 30), {F} frames, resize+crop to 224, batch 8:")
    out = {}
    for mode in ("test", "train"):
        ds = get_dataset("collection", tmp, "all", frames=F, size=224, train=mode == "train", manifest=None)
        for w in workers:
            loader = build_loader(ds, 8, num_workers=w, shuffle=False, drop_last=False)
            t = time.perf_counter()
            n = sum(len(b["video_id"]) for b in loader)
            dt = time.perf_counter() - t
            print(f"  {mode:<5} sampling, {w} workers: {n / dt:6.1f} videos/s")
            out[f"{mode}_w{w}"] = round(n / dt, 1)
    return out


def bench_synthetic(tmp: Path, workers: list[int]) -> dict:
    from vop.data.synth import generate_world

    t = time.perf_counter()
    generate_world(tmp / "world", seed=0, size="small")
    gen = time.perf_counter() - t
    print(f"\nsynthetic world 'small' generated in {gen:.1f} s; loader over its train split "
          f"(16-frame 64x64 lossless h264), 12 frames, 64 px, batch 32:")
    out = {"generate_small_s": round(gen, 1)}
    ds = get_dataset("collection", tmp / "world", "train", frames=F, size=64)
    for w in workers:
        loader = build_loader(ds, 32, num_workers=w)
        t = time.perf_counter()
        n = sum(len(b["video_id"]) for b in loader)
        dt = time.perf_counter() - t
        print(f"  train sampling, {w} workers: {n / dt:6.1f} videos/s")
        out[f"train_w{w}"] = round(n / dt, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic world (its generation takes ~15 s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} "
          f"{os.cpu_count()} CPUs, PyAV {av.__version__} (FFmpeg libavcodec {av.library_versions['libavcodec']}), "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        results = {"decode": bench_decode(Path(d), args.repeats), "modes": bench_modes(Path(d), args.repeats),
                   "loader": bench_loader(Path(d), args.workers)}
        if not args.no_synthetic:
            results["synthetic"] = bench_synthetic(Path(d), args.workers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
