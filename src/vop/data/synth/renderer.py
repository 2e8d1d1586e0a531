"""Drawing scenes: anti-aliased frames of objects and clips, and encoding frames as video files."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from vop._optional import require
from vop.data.synth.scenes import BACKGROUND, COLOURS, Clip, Obj

__all__ = ["render", "render_clip", "write_video"]


def _lerp(a: Obj, b: Obj, p: float) -> tuple[Obj, np.ndarray]:
    mix = lambda u, v: u + (v - u) * p  # noqa: E731
    rgb = np.array(COLOURS[a.colour], np.float32) * (1 - p) + np.array(COLOURS[b.colour], np.float32) * p
    return Obj(a.shape, b.colour if p >= 0.5 else a.colour, mix(a.x, b.x), mix(a.y, b.y), mix(a.r, b.r),
               mix(a.alpha, b.alpha)), rgb


def _states_at(clip: Clip, t: float) -> list[tuple[Obj, np.ndarray]]:
    out = []
    for i, s in enumerate(clip.objects):
        rgb = np.array(COLOURS[s.colour], np.float32)
        for e in clip.events:
            if e.obj != i or t <= e.t0:
                continue
            p = min(1.0, (t - e.t0) / (e.t1 - e.t0))
            s, rgb = _lerp(s, e.after, p)
        out.append((s, rgb))
    return out


@lru_cache(maxsize=8)
def _axis(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n  # pixel centres in canvas fractions


def _mask(shape: str, X: np.ndarray, Y: np.ndarray, x: float, y: float, r: float) -> np.ndarray:
    if shape == "circle":
        m = (X - x) ** 2 + (Y - y) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.86  # about the area of the circle
        m = (np.abs(X - x) <= h) & (np.abs(Y - y) <= h)
    elif shape == "triangle":  # pointing up
        top, bottom = y - r, y + 0.8 * r
        m = (Y >= top) & (Y <= bottom) & (np.abs(X - x) <= (Y - top) / (bottom - top) * r * 1.1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.astype(np.float32)


def render(objects: Sequence[tuple[Obj, np.ndarray] | Obj], size: int = 64, ss: int = 2) -> np.ndarray:
    """Draw objects (in order, alpha-blended) on the background: ``(size, size, 3)`` uint8.

    Items are ``Obj`` or ``(Obj, rgb)`` (a colour between two named ones). Anti-aliased by
    ``ss`` x ``ss`` supersampling.
    """
    n = size * ss
    axis = _axis(n)
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for item in objects:
        o, rgb = item if isinstance(item, tuple) else (item, np.array(COLOURS[item.colour], np.float32))
        if o.alpha <= 0 or o.r <= 0:
            continue
        e = 1.15 * o.r  # the shape's extent around its centre
        x0, x1 = max(0, int((o.x - e) * n)), min(n, int((o.x + e) * n) + 2)
        y0, y1 = max(0, int((o.y - e) * n)), min(n, int((o.y + e) * n) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        X, Y = np.meshgrid(axis[x0:x1], axis[y0:y1])
        a = _mask(o.shape, X, Y, o.x, o.y, o.r)[..., None] * o.alpha
        patch = img[y0:y1, x0:x1]
        patch += (rgb - patch) * a
    img = sum(img[i::ss, j::ss] for i in range(ss) for j in range(ss)) / (ss * ss)  # box filter
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_clip(clip: Clip, size: int = 64) -> np.ndarray:
    """All frames of a clip: ``(T, size, size, 3)`` uint8."""
    return np.stack([render(_states_at(clip, t), size) for t in range(clip.frames)])


# --------------------------------------------------------------------------------------------
# Video files


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, *, codec: str = "libx264",
                lossless: bool = True, options: dict[str, str] | None = None, pix_fmt: str | None = None,
                gop: int | None = None, bframes: int | None = None) -> Path:
    """Encode ``(T, H, W, 3)`` uint8 frames with PyAV (container from the file extension).

    ``lossless`` (x264 only): qp 0 in yuv444p, so equal frames decode equal. One encoder thread,
    so the bytes do not depend on the machine. ``gop``/``bframes`` set the keyframe interval and
    B-frame count (for tests of sparse keyframes).
    """
    av = require("av", "writing video (PyAV)")
    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        opts = dict(options or {})
        if codec == "libx264":
            s.pix_fmt = pix_fmt or ("yuv444p" if lossless else "yuv420p")
            if lossless:
                opts.setdefault("qp", "0")
            params = ["threads=1"]
            if gop:
                params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0"]
            if bframes is not None:
                params.append(f"bframes={bframes}")
            opts.setdefault("x264-params", ":".join(params))
        else:
            s.pix_fmt = pix_fmt or "yuv420p"
            s.codec_context.thread_count = 1
            if gop:
                s.codec_context.gop_size = gop
            if bframes is not None:
                s.codec_context.max_b_frames = bframes
        s.options = opts
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path
