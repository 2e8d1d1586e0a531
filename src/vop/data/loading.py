"""Loading a dataset: ``get_dataset`` turns annotations of a known format (:mod:`vop.data.formats`)
into a ready :class:`~vop.data.dataset.VideoTextDataset`, leaving out videos that a
``vop data verify`` manifest lists as bad or whose file is missing."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from vop.data.dataset import VideoTextDataset
from vop.data.transforms import Preprocess
from vop.data.formats import get_format, load_records
from vop.data.verify import manifest_path, read_manifest, still_bad
from vop.errors import DataError

__all__ = ["get_dataset"]

log = logging.getLogger("vop.data")


def get_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    frames: int | None = None,
    size: int = 224,
    train: bool | None = None,
    seed: int = 0,
    videos_dir: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None | Literal["auto"] = "auto",
    missing: Literal["drop", "keep", "error"] = "drop",
    preprocess: Preprocess | None = None,
) -> VideoTextDataset:
    """Build the dataset ``name`` (msrvtt, didemo, activitynet, lsmdc, collection) for ``split``.

    - ``frames``: frames per video (default 12; 64 for the paragraph datasets didemo/activitynet);
      ``size``: side of the square frames handed out (resize short side + centre crop, or as
      ``preprocess``, the backbone's, says: ``model.clip.preprocess``).
    - ``train``: random frame per segment (default: True for training splits only), seeded by
      ``(seed, epoch, sample index)``.
    - ``manifest``: a ``vop data verify`` manifest whose bad videos are left out; ``"auto"`` uses
      ``<root>/vop-verify-<name>-<split>.json`` and ``...-all.json`` when they exist; ``None``: none.
    - ``missing``: videos whose file is absent are left out (``"drop"``, logged and listed in
      ``dataset.dropped``), kept so that loading skips them (``"keep"``), or an ``"error"``.
    """
    fmt = get_format(name)
    records, split = load_records(name, root, split, videos_dir=videos_dir, annotations=annotations)
    dropped: dict[str, str] = {}
    if manifest == "auto":  # the split's own manifest, and one written for every row ("all")
        paths = [p for p in {manifest_path(root, name, s) for s in (split, "all")} if p.is_file()]
    else:
        paths = [Path(manifest)] if manifest is not None else []
    kinds: dict[str, str] = {}
    if paths:
        files = {r.video_id: r.video_path for r in records}
        for path in sorted(paths):
            report = read_manifest(path)
            for bad in report.missing + report.undecodable:
                vid = bad["video_id"]
                if vid not in files or vid in dropped:
                    continue
                why = still_bad(bad, files[vid])  # a restored or replaced file is checked again
                if why is None:
                    log.info("%s: listed as bad in %s but readable now; kept", files[vid], path)
                elif why != "missing file":  # a missing file is handled below, as `missing` says
                    dropped[vid], kinds[vid] = f"listed as bad in {path}: {why}", "undecodable"
    if missing != "keep":
        seen: set[str] = set(dropped)
        absent: dict[str, str] = {}
        for r in records:
            if r.video_id not in seen:
                seen.add(r.video_id)
                if not Path(r.video_path).is_file():
                    absent[r.video_id] = f"video file not found: {r.video_path}"
                    kinds[r.video_id] = "missing"
        if missing == "error" and absent:
            raise DataError(f"{name} {split}: {len(absent)} videos missing, e.g. {next(iter(absent.values()))}; "
                            "run `vop data verify` for the full list")
        dropped.update(absent)
    total, all_records = len(records), records
    if dropped:
        kept = [r for r in records if r.video_id not in dropped]
        log.warning("%s %s: left out %d videos (%d samples), e.g. %s", name, split, len(dropped),
                    len(records) - len(kept), next(iter(dropped.values())))
        records = kept
    ds = VideoTextDataset(
        records,
        frames=fmt.frames if frames is None else frames,  # 0 is refused, never read as "the default"
        size=size,
        train=(split in fmt.train_splits) if train is None else train,
        seed=seed,
        cache_dir=cache_dir,
        name=name,
        split=split,
        preprocess=preprocess,
    )
    ds.dropped.update(dropped)
    ds.dropped_kinds.update({v: kinds[v] for v in dropped})
    ds.dropped_samples = total - len(records)
    by_kind: dict[str, int] = {}
    for r in all_records:
        if r.video_id in dropped:
            by_kind[kinds[r.video_id]] = by_kind.get(kinds[r.video_id], 0) + 1
    ds.dropped_samples_by_kind = by_kind
    return ds
