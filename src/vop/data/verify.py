"""Check that every video of a dataset split exists and decodes; write/read the manifest.

The manifest (JSON) lists the bad videos; :func:`vop.data.get_dataset` leaves them out when it
finds one (by default at :func:`manifest_path` inside the dataset root). An entry whose file has
changed since (restored, replaced: other size or mtime) is checked again, never trusted blindly.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from vop.data.decode import check_video
from vop.data.formats import load_records
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
        return VerifyReport(**fields)
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found; run `vop data verify` first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a vop data manifest ({e}); rerun `vop data verify`") from None


class _Check(Dataset):
    def __init__(self, items: list[tuple[str, Path]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, str, str | None, bool, dict]:
        vid, path = self.items[i]
        if not path.is_file():
            return vid, str(path), None, False, {}
        sig = file_signature(path)
        try:
            check_video(path)
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
) -> VerifyReport:
    """Parse the annotations, then check each unique video: present, demuxes, first and last
    frames decode (:func:`vop.data.decode.check_video`)."""
    records, split = load_records(name, root, split, videos_dir=videos_dir, annotations=annotations)
    videos: dict[str, Path] = {}
    for r in records:
        videos.setdefault(r.video_id, Path(r.video_path))
    report = VerifyReport(name, split, str(root), samples=len(records), videos=len(videos))
    loader = DataLoader(_Check(list(videos.items())), batch_size=None, num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(videos), desc="verify", unit="video", disable=None)  # off when not a tty
    for vid, path, error, exists, sig in loader:
        if not exists:
            report.missing.append({"video_id": vid, "path": path})
        elif error is not None:
            report.undecodable.append({"video_id": vid, "path": path, "error": error, **sig})
    return report
