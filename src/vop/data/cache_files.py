"""Frame cache entries: where a video's cached frames are stored and how one is read back.

Layout: ``<cache_dir>/f<F>_s<size>[_<resize>-<interpolation>]/<video id, %-quoted>.npz`` holding ``frames``
``(F, 3, size, size)`` uint8 and ``indices`` ``(F,)`` int64 (the decoded frame indices).
Written by :func:`vop.data.cache.build_cache`, read by the datasets (:mod:`vop.data.dataset`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from vop.errors import DataError

__all__ = ["cache_file", "read_cached"]


def cache_file(cache_dir: str | os.PathLike, video_id: str, frames: int, size: int, tag: str = "") -> Path:
    """``tag``: the geometry of frames not prepared as CLIP's (``Preprocess.tag()``, e.g. "_squash-bilinear")."""
    name = quote(video_id, safe="")
    if len(name) > 200:
        name = hashlib.sha1(video_id.encode()).hexdigest()
    return Path(cache_dir) / f"f{frames}_s{size}{tag}" / f"{name}.npz"


def read_cached(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    try:
        with np.load(path) as z:
            return torch.from_numpy(z["frames"]), z["indices"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: unreadable frame cache entry ({e}); delete it or rebuild the cache") from None
