"""Check that every video of a dataset split exists and decodes; write/read the manifest.

"Decodes" means what training and evaluation will read: the frames of
:func:`vop.data.decode.verify_indices` (first and last, the test-sampled ones and one
train-sampling draw), not only the first and last.

The manifest (JSON) lists the bad videos; :func:`vop.data.get_dataset` leaves them out when it
finds one (by default at :func:`manifest_path` inside the dataset root). An entry whose file has
changed since (restored, replaced: other size or mtime) is checked again, never trusted blindly.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from vop.data.decode import check_video
from vop.data.formats import get_format, load_records
from vop.errors import DataError

__all__ = ["VerifyReport", "verify", "manifest_path", "write_manifest", "read_manifest", "still_bad"]


@dataclass
class VerifyReport:
    dataset: str
    split: str
    root: str
    samples: int = 0
    videos: int = 0
    missing: list[dict] = field(default_factory=list)  # {"video_id", "path"}
    undecodable: list[dict] = field(default_factory=list)  # {"video_id", "path", "error", "size", "mtime_ns"}
    frames: int = 12  # the test sampling checked (and one train draw)
    skipped: list[dict] = field(default_factory=list)  # left out of the videos folder walk: {"path", "reason"}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.undecodable

    def bad_ids(self) -> set[str]:
        return {b["video_id"] for b in self.missing + self.undecodable}

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.videos - len(self.missing) - len(self.undecodable)}


def manifest_path(root: str | os.PathLike, dataset: str, split: str) -> Path:
    """Default manifest location: ``<root>/vop-verify-<dataset>-<split>.json``."""
    return Path(root) / f"vop-verify-{dataset}-{split}.json"


def write_manifest(report: VerifyReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot write the manifest ({e}); choose another path with --manifest") from None
    return path


def read_manifest(path: str | os.PathLike) -> VerifyReport:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fields = {k: data[k] for k in ("dataset", "split", "root", "samples", "videos", "missing", "undecodable")}
        fields.update({k: data[k] for k in ("frames", "skipped", "seconds") if k in data})
        return VerifyReport(**fields)
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found; run `vop data verify` first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a vop data manifest ({e}); rerun `vop data verify`") from None


class _Check(Dataset):
    def __init__(self, items: list[tuple[str, Path]], frames: int = 12):
        self.items, self.frames = items, frames

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, str, str | None, bool, dict]:
        vid, path = self.items[i]
        if not path.is_file():
            return vid, str(path), None, False, {}
        sig = file_signature(path)
        try:
            check_video(path, self.frames, key=i)
            return vid, str(path), None, True, sig
        except DataError as e:
            return vid, str(path), str(e), True, sig


def file_signature(path: str | os.PathLike) -> dict:
    """Size and modification time: a manifest entry whose file no longer has them is checked again."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def still_bad(entry: dict, path: str | os.PathLike) -> str | None:
    """Whether a manifest entry (missing or undecodable video) still holds for the file at ``path``:
    the reason if so, None if the file has been restored or replaced by a readable one since."""
    path = Path(path)
    if not path.is_file():
        return "missing file"
    if "error" in entry and entry.get("size") is not None:
        sig = file_signature(path)
        if sig == {"size": entry["size"], "mtime_ns": entry.get("mtime_ns")}:
            return entry["error"]  # the very file that failed: no need to decode it again
    try:  # restored, replaced, or an old manifest without a signature: check it again
        check_video(path)
    except DataError as e:
        return f"{e} (checked again)"
    return None


def verify(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    videos_dir: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = False,
    frames: int | None = None,
) -> VerifyReport:
    """Parse the annotations, then check each unique video: present, demuxes, and the frames
    training and evaluation read decode (:func:`vop.data.decode.check_video` with ``frames``
    per video, default the dataset's: 12, or 64 for didemo/activitynet)."""
    t0 = time.perf_counter()
    skipped: list[tuple[Path, str]] = []
    records, split = load_records(name, root, split, videos_dir=videos_dir, annotations=annotations, skipped=skipped)
    frames = get_format(name).frames if frames is None else frames
    videos: dict[str, Path] = {}
    for r in records:
        videos.setdefault(r.video_id, Path(r.video_path))
    report = VerifyReport(name, split, str(root), samples=len(records), videos=len(videos), frames=frames,
                          skipped=[{"path": str(p), "reason": why} for p, why in skipped])
    loader = DataLoader(_Check(list(videos.items()), frames), batch_size=None, num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(videos), desc="verify", unit="video", disable=None)  # off when not a tty
    for vid, path, error, exists, sig in loader:
        if not exists:
            report.missing.append({"video_id": vid, "path": path})
        elif error is not None:
            report.undecodable.append({"video_id": vid, "path": path, "error": error, **sig})
    report.seconds = round(time.perf_counter() - t0, 3)
    return report
