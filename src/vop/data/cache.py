"""Frame cache: the test-sampled, resized uint8 frames of each video, one ``.npz`` per video.

Layout: ``<cache_dir>/f<F>_s<size>[_<resize>-<interpolation>]/<video id, %-quoted>.npz`` holding ``frames``
``(F, 3, size, size)`` uint8 and ``indices`` ``(F,)`` int64 (the decoded frame indices). A
dataset given ``cache_dir`` reads from it when it samples test frames (evaluation, or training
without random frame sampling) and decodes videos missing from it. Rebuild the cache
(``vop data cache --overwrite``) after changing videos. The entries' layout and reader are in
:mod:`vop.data.cache_files` (the datasets read them; this module writes them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vop.data.cache_files import cache_file
from vop.data.dataset import VideoDataset, build_loader

__all__ = ["build_cache", "CacheReport"]


@dataclass
class CacheReport:
    directory: Path
    written: int = 0
    existing: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # video id -> error


def build_cache(dataset, out: str | os.PathLike, *, num_workers: int = 0, overwrite: bool = False,
                batch_size: int = 8) -> CacheReport:
    """Decode (test sampling) every unique video of ``dataset`` and store its frames under ``out``."""
    f, s, pre = dataset.frames, dataset.size, dataset.preprocess
    tag = pre.tag() if pre is not None else ""
    todo = [
        (v, p) for v, p in zip(dataset.videos, dataset.video_paths)
        if overwrite or not cache_file(out, v, f, s, tag).is_file()
    ]
    report = CacheReport(Path(out) / f"f{f}_s{s}{tag}", existing=len(dataset.videos) - len(todo))
    report.directory.mkdir(parents=True, exist_ok=True)
    if not todo:
        return report
    gallery = VideoDataset([v for v, _ in todo], [p for _, p in todo], frames=f, size=s, preprocess=pre)
    loader = build_loader(gallery, batch_size, shuffle=False, num_workers=num_workers, pin_memory=False)
    for batch in loader:
        for vid, frames, idx in zip(batch["video_id"], batch["video"], batch["frame_indices"]):
            target = cache_file(out, vid, f, s, tag)
            tmp = target.with_suffix(".tmp.npz")
            np.savez(tmp, frames=frames.numpy(), indices=idx.numpy())
            os.replace(tmp, target)
            report.written += 1
    report.failed = {v: f.error for v, f in loader.failures.items()}
    return report
