"""Frame-exact video decoding with PyAV.

Frame index
    Frame ``i`` of a video is its ``i``-th frame in presentation order: the packets of the video
    stream are read once (demuxed, not decoded) and their timestamps sorted. That definition needs
    no frame rate, no time-base arithmetic and no container seek, so it gives the same frames for
    any container, codec, keyframe layout or variable frame rate, on any machine.

Decoding
    To get frame ``i`` the decoder starts at the last keyframe that precedes it both in decode
    order and in presentation order (so B-frames and open-GOP leading pictures that reference the
    previous group decode correctly) and decodes forward until frame ``i`` comes out. Targets
    that share a start keyframe, or lie ahead of the decoder's current position, are collected in
    one forward pass; otherwise the decoder is flushed and restarted at the next keyframe. Only
    the selected frames are converted to RGB.

Sampling (``sample_indices``)
    The video's time is cut into ``F`` equal segments (frame ``k`` is shown during ``[k, k+1)``).
    Test: the frame shown at the centre of each segment; a centre that falls exactly between two
    frames takes the one nearer the middle of the video, so that sampling commutes with time
    reversal. Train: the frame shown at a uniformly random time of each segment, drawn from the
    generator passed in.

Short videos (``n < F``)
    The same rule applies: segments are shorter than a frame, so frames repeat in time order
    (``n = 5, F = 12`` gives ``0 0 1 1 1 2 2 3 3 3 4 4``). Every video yields exactly ``F`` frames
    and there is no validity mask: a repeated frame is a real frame of the video, shown for that
    stretch of time, and mean pooling over frames stays a time-weighted average.

Errors
    A missing, empty, truncated or undecodable file raises :class:`vop.errors.DataError` naming
    the file; decoding never substitutes a blank frame. PyAV is imported on first use: without it,
    opening a video raises :class:`vop.errors.MissingDependencyError` (``pip install av``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vop._optional import require
from vop.errors import DataError

__all__ = [
    "VideoInfo",
    "VideoReader",
    "sample_indices",
    "load_frames",
    "decode_frames",
    "video_info",
    "check_video",
]


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds: ``num_frames`` is exact (packets counted, not estimated)."""

    path: str
    num_frames: int
    fps: float
    duration: float  # seconds, num_frames / fps
    width: int
    height: int
    codec: str


def sample_indices(
    num_frames: int,
    frames: int,
    *,
    train: bool = False,
    generator: torch.Generator | np.random.Generator | None = None,
) -> np.ndarray:
    """Indices (int64, length ``frames``, non-decreasing) of the frames to sample.

    Time is cut into ``frames`` equal segments; frame ``k`` is shown during ``[k, k + 1)``.

    ``train=False``: the frame shown at the centre of each segment, ``(i + 1/2) * n / F``.
    When a centre falls exactly between two frames, the one nearer the middle of the video is
    taken, so that sampling commutes with time reversal: the sampled frames of a reversed video
    are the reversed sampled frames (exactly so for even ``F``).
    ``train=True``: the frame shown at a uniformly random time inside each segment, drawn from
    ``generator`` (a seeded ``torch.Generator`` or ``numpy.random.Generator``; required, so that
    sampling is reproducible).
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    n = num_frames
    if not train:
        q, r = np.divmod((2 * np.arange(frames, dtype=np.int64) + 1) * n, 2 * frames)  # centre = q + r / 2F
        return np.where((r == 0) & (2 * q >= n), q - 1, q)
    if generator is None:
        raise ValueError("train sampling needs a seeded generator (torch.Generator or numpy Generator)")
    if isinstance(generator, torch.Generator):
        u = torch.rand(frames, generator=generator, dtype=torch.float64).numpy()
    else:
        u = generator.random(frames)
    return np.minimum(((np.arange(frames) + u) * n / frames).astype(np.int64), n - 1)


def _av():
    av = require("av", "decoding video (PyAV)")
    require("av.video.reformatter", "decoding video (PyAV)", package="av")
    return av


def _fail(path: str | os.PathLike, what: str) -> DataError:
    return DataError(f"{path}: {what}. Replace it with a working copy (or re-encode it: "
                     "ffmpeg -i IN -c:v libx264 OUT.mp4), or run `vop data verify` to leave it out.")


class VideoReader:
    """An open video: exact frame count, and frames by presentation index.

    >>> with VideoReader("clip.mp4") as v:
    ...     frames = v.get(sample_indices(v.num_frames, 12))   # (12, H, W, 3) uint8

    The packets of the video stream are demuxed once when the reader opens (this reads the file
    but decodes nothing) and kept in memory, so memory use is about the compressed size of the
    video stream.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 1):
        av = _av()
        self.path = str(path)
        self._rgb = av.video.reformatter.VideoReformatter()  # keeps its conversion context: ~10x faster than to_ndarray(format=)
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: video file not found. Check the dataset root / videos folder.")
        if p.stat().st_size == 0:
            raise _fail(path, "the file is empty (0 bytes)")
        try:
            self._container = av.open(self.path)
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise _fail(path, f"cannot open as a video ({e})") from None
        try:
            self._index()
            cc = self._stream.codec_context
            cc.thread_count = threads
        except DataError:
            self.close()
            raise
        except (av.FFmpegError, OSError) as e:
            self.close()
            raise _fail(path, f"cannot read the video stream ({e})") from None

    def _index(self) -> None:
        streams = self._container.streams.video
        if not streams:
            raise _fail(self.path, "no video stream")
        self._stream = stream = streams[0]
        # Every packet is decoded when needed; packets flagged "discard" (e.g. trimmed by an mp4
        # edit list) may be references for others, but are not frames of the video.
        packets = [p for p in self._container.demux(stream) if p.size > 0]
        shown = [i for i, p in enumerate(packets) if not p.is_discard]
        if not shown:
            raise _fail(self.path, "the video stream holds no frame")
        if any(packets[i].pts is None for i in shown):
            raise _fail(self.path, "packets without presentation timestamps")
        declared = stream.frames
        if declared > 0 and len(packets) < declared:
            raise _fail(self.path, f"truncated: {len(packets)} of {declared} frames present")
        none = np.iinfo(np.int64).min
        pts = np.array([none if p.pts is None else p.pts for p in packets], dtype=np.int64)
        shown = np.array(shown, dtype=np.int64)
        order = shown[np.argsort(pts[shown], kind="stable")]  # frame index -> decode position
        if np.any(np.diff(pts[order]) == 0):
            raise _fail(self.path, "several frames share one timestamp")
        self._packets = packets
        self._pts = pts  # by decode position
        self._pos_of_frame = order
        key_pos = np.array([i for i, p in enumerate(packets) if p.is_keyframe], dtype=np.int64)
        if key_pos.size == 0 or key_pos[0] != 0:
            key_pos = np.concatenate([[0], key_pos[key_pos != 0]])  # always decodable from the start
        self._key_pos = key_pos
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate and len(order) > 1 and stream.time_base:
            span = Fraction(int(pts[order[-1]] - pts[order[0]])) * stream.time_base
            rate = (len(order) - 1) / span if span else None
        self.fps = float(rate) if rate else 0.0
        self.num_frames = len(order)
        cc = stream.codec_context
        self.width, self.height, self.codec = cc.width, cc.height, cc.name

    @property
    def info(self) -> VideoInfo:
        duration = self.num_frames / self.fps if self.fps else 0.0
        return VideoInfo(self.path, self.num_frames, self.fps, duration, self.width, self.height, self.codec)

    def _start_of(self, frame: int) -> int:
        """Decode position of the keyframe to start from for ``frame``."""
        pos = self._pos_of_frame[frame]
        target_pts = self._pts[pos]
        keys = self._key_pos[self._key_pos <= pos]
        keys = keys[self._pts[keys] <= target_pts]
        return int(keys[-1]) if keys.size else 0

    def get(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """RGB frames ``(len(indices), H, W, 3)`` uint8, in the order of ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("no frame index given")
        if idx.min() < 0 or idx.max() >= self.num_frames:
            raise ValueError(f"{self.path}: frame index out of range [0, {self.num_frames})")
        wanted = np.unique(idx)
        want_pts = {int(self._pts[self._pos_of_frame[i]]): int(i) for i in wanted}
        got: dict[int, np.ndarray] = {}
        # Runs: one forward pass per start keyframe; a target whose start keyframe lies before the
        # end of the current run is reached by decoding on.
        starts = [(self._start_of(int(i)), int(self._pos_of_frame[i])) for i in wanted]
        starts.sort()
        runs: list[list[int]] = []
        for s, e in starts:
            if runs and s <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], e)
            else:
                runs.append([s, e])
        cc = self._stream.codec_context
        av = _av()
        try:
            for s, e in runs:
                cc.flush_buffers()  # a fresh start at a keyframe (also after an earlier get())
                need = {p for p, i in want_pts.items() if i not in got and s <= self._pos_of_frame[i] <= e}
                if need:
                    self._decode_run(cc, s, need, want_pts, got)
        except (av.FFmpegError, OSError) as e:
            raise _fail(self.path, f"decoding failed ({e})") from None
        missing = sorted(set(want_pts.values()) - set(got))
        if missing:
            raise _fail(self.path, f"frames {missing[:5]} could not be decoded (inconsistent timestamps or damaged data)")
        return np.stack([got[int(i)] for i in idx])

    def _decode_run(self, cc, start: int, need: set[int], want_pts: dict[int, int], got: dict) -> None:
        """Decode from the keyframe at ``start`` until every pts in ``need`` came out.

        Packets of frames nobody references (non-reference B-frames) are skipped unless they are
        wanted: exact by definition, and ~20% less decoding on typical h264. Any other wanted
        frame passing by is kept too, except those shown before the start keyframe (open-GOP
        leading pictures that reference an earlier group: not decodable from here).
        """
        first_pts = self._pts[start]
        wanted_pos = {int(self._pos_of_frame[i]) for i in want_pts.values() if i not in got}
        size: dict = {}
        if got:
            h, w = next(iter(got.values())).shape[:2]
            size = {"width": w, "height": h}
        pending = set(need)
        skip = None
        for pos in range(start, len(self._packets) + 1):
            packet = self._packets[pos] if pos < len(self._packets) else None  # None drains
            mode = "DEFAULT" if packet is None or pos in wanted_pos else "NONREF"
            if mode != skip:
                cc.skip_frame = skip = mode
            for frame in cc.decode(packet):
                i = want_pts.get(frame.pts)
                if i is None or i in got or frame.pts < first_pts:
                    continue
                got[i] = self._rgb.reformat(frame, format="rgb24", **size).to_ndarray()
                size = size or {"width": got[i].shape[1], "height": got[i].shape[0]}
                pending.discard(frame.pts)
            if not pending:
                return

    def close(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            c.close()
            self._container = None
            self._packets = []

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass


def load_frames(
    path: str | os.PathLike,
    frames: int,
    *,
    train: bool = False,
    generator: torch.Generator | np.random.Generator | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample and decode ``frames`` frames: returns ``(frames (F, H, W, 3) uint8, indices (F,))``."""
    with VideoReader(path, threads=threads) as v:
        idx = sample_indices(v.num_frames, frames, train=train, generator=generator)
        return v.get(idx), idx


def decode_frames(path: str | os.PathLike, indices: Sequence[int], *, threads: int = 1) -> np.ndarray:
    """Frames at the given presentation indices: ``(len(indices), H, W, 3)`` uint8."""
    with VideoReader(path, threads=threads) as v:
        return v.get(indices)


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Exact frame count, frame rate, duration and size (demuxes the file; decodes nothing)."""
    with VideoReader(path) as v:
        return v.info


def check_video(path: str | os.PathLike) -> VideoInfo:
    """Cheap usability check: the whole stream demuxes, and its first and last frames decode."""
    with VideoReader(path) as v:
        v.get([0, v.num_frames - 1])
        return v.info
