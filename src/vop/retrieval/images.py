"""Thumbnail strips: a few frames side by side, written as one small image per video.

No imaging library is needed: JPEG is encoded with FFmpeg's ``mjpeg`` encoder through PyAV (already a
dependency for decoding); if that encoder is missing from the FFmpeg build, a PNG is written with
``zlib`` alone. :func:`image_mime` tells the two apart by their magic bytes.
"""
from __future__ import annotations

import struct
import zlib
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["thumbnail_strip", "encode_jpeg", "encode_png", "encode_image", "image_mime", "pick_thumb_frames"]


def pick_thumb_frames(n: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``n`` sampled frames (all of them when ``n <= count``)."""
    if n <= count:
        return list(range(n))
    return [int(round(x)) for x in np.linspace(0, n - 1, count)]


def thumbnail_strip(frames: np.ndarray, height: int = 96) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames -> one ``(h, T * w, 3)`` uint8 strip, each frame scaled to ``height``
    (aspect kept; both sides rounded to even numbers for the 4:2:0 JPEG encoder)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {frames.shape}")
    _, h, w, _ = frames.shape
    nh = max(2, 2 * round(height / 2))
    nw = max(2, 2 * round(w * nh / h / 2))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if (h, w) != (nh, nw):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    # frames side by side: (T, 3, h, w) -> (h, T*w, 3)
    return x.permute(2, 0, 3, 1).reshape(nh, -1, 3).contiguous().numpy()


def encode_jpeg(img: np.ndarray, quality: int = 4) -> bytes:
    """RGB uint8 ``(H, W, 3)`` (even sides) -> JPEG bytes via FFmpeg's mjpeg encoder.
    ``quality`` is FFmpeg's qscale, 2 (best) .. 31."""
    from vop._optional import require

    av = require("av", "encoding JPEG thumbnails (PyAV)")

    h, w = img.shape[:2]
    cc = av.CodecContext.create("mjpeg", "w")
    cc.width, cc.height, cc.pix_fmt = w, h, "yuvj420p"
    cc.time_base = Fraction(1, 25)
    cc.thread_count = 1
    cc.qmin = cc.qmax = int(quality)
    cc.open()
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(format="yuvj420p")
    packets = list(cc.encode(frame)) + list(cc.encode(None))
    data = b"".join(bytes(p) for p in packets)
    if not data.startswith(b"\xff\xd8"):
        raise RuntimeError("the mjpeg encoder returned no JPEG")
    return data


def encode_png(img: np.ndarray) -> bytes:
    """RGB uint8 ``(H, W, 3)`` -> PNG bytes (8-bit truecolour, zlib level 6, no filter)."""
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + np.ascontiguousarray(img[y]).tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def encode_image(img: np.ndarray) -> tuple[bytes, str]:
    """JPEG when FFmpeg can encode it, else PNG. Returns ``(bytes, extension)``."""
    try:
        return encode_jpeg(img), ".jpg"
    except Exception:  # an FFmpeg build without mjpeg: fall back to a lossless PNG
        return encode_png(img), ".png"


def image_mime(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG"):
        return "image/png"
    return "application/octet-stream"
