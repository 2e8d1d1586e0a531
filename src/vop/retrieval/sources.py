"""What to index: every video file under a folder, or the videos of a collection annotation file.

A :class:`Source` is one video: a stable id (the path relative to the folder, or the collection's
``video`` value), its file, and for annotated collections its captions (shown in the web page).
The *signature* of a file (size and modification time, or a SHA-256 of its bytes) decides whether
an already indexed video must be encoded again.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from vop.errors import DataError

__all__ = ["Source", "list_sources", "file_signature", "ANNOTATION_SUFFIXES"]

ANNOTATION_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Source:
    id: str
    path: Path
    captions: list[str] = field(default_factory=list)


def _video_exts() -> tuple[str, ...]:
    from vop.data.files import VIDEO_EXTS

    return VIDEO_EXTS


def _list_folder(root: Path, exclude: list[Path], skipped: dict[str, str]) -> list[Source]:
    from vop.data.files import walk_videos

    walk = walk_videos(root, exclude=exclude)  # links to folders followed, each real folder once
    for p, why in walk.skipped:
        skipped[str(p)] = why
    out = [Source(p.relative_to(root).as_posix(), p) for p in walk.files]
    out.sort(key=lambda s: s.id)
    return out


def _list_annotations(path: Path, split: str, root: Path | None) -> tuple[list[Source], dict[str, str]]:
    from vop.data.formats import load_records

    if root is None:  # videos are relative to the collection root: the file's folder (or its parent for annotations/)
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
    records, _ = load_records("collection", root, split, annotations=path)
    by_id: dict[str, Source] = {}
    for r in records:
        s = by_id.get(r.video_id)
        if s is None:
            s = by_id[r.video_id] = Source(r.video_id, Path(r.video_path))
        s.captions.append(r.caption)
    missing = {s.id: f"{s.path}: no such file" for s in by_id.values() if not s.path.is_file()}
    return [s for s in by_id.values() if s.id not in missing], missing


def list_sources(videos: str | os.PathLike, *, split: str = "all", root: str | os.PathLike | None = None,
                 exclude: list[Path] | None = None, skipped: dict[str, str] | None = None) -> tuple[list[Source], dict[str, str]]:
    """The videos to index and the ones that are listed but absent (``{id: reason}``).

    ``videos``: a folder (every file with a video extension below it, recursively, following links
    to folders, each real folder once: :func:`vop.data.files.walk_videos`), or a collection
    annotation file (``.csv``/``.jsonl`` with ``video``, ``caption``, optional ``split``; videos
    relative to ``root``, by default the file's folder). ``skipped`` receives what the folder walk
    left out (``{path: reason}``: hidden, not a video extension, link cycle, broken link...).
    """
    p = Path(videos)
    if p.is_dir():
        found = _list_folder(p, exclude or [], skipped if skipped is not None else {})
        if not found:
            raise DataError(f"{p}: no video file found below it (extensions: {' '.join(_video_exts())})")
        return found, {}
    if p.is_file():
        if p.suffix.lower() not in ANNOTATION_SUFFIXES:
            raise DataError(f"{p}: give a folder of videos or a collection annotation file (.csv or .jsonl with "
                            "columns video, caption[, split]); to index one video, give its folder")
        found, missing = _list_annotations(p, split, Path(root) if root is not None else None)
        if not found:
            raise DataError(f"{p}: none of the {len(missing)} videos it lists exists (first: {next(iter(missing.values()), '')})")
        return found, missing
    raise DataError(f"{p}: no such folder or annotation file")


def file_signature(path: Path, content_hash: bool = False) -> dict:
    """``size`` and ``mtime_ns`` of a file, plus ``sha256`` of its bytes when ``content_hash``."""
    st = path.stat()
    sig = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content_hash:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        sig["sha256"] = h.hexdigest()
    return sig


def same_file(old: dict, new: dict) -> bool:
    """Whether an indexed entry's signature still describes the file: by content hash when both
    have one, else by size and modification time."""
    if "sha256" in old and "sha256" in new:
        return old["sha256"] == new["sha256"]
    return old.get("size") == new.get("size") and old.get("mtime_ns") == new.get("mtime_ns")
