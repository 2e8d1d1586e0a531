"""Finding video files: one list of extensions and one folder walk for every command.

The dataset finder (by-stem lookup of ``vop.data.formats``), ``vop data verify`` and ``vop index``
all use :func:`walk_videos`: it follows symbolic links to folders but enters each real folder
once (a link cycle, or a second path to a folder already listed, is skipped, never walked
forever), and it reports everything it leaves out, with the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

__all__ = ["VIDEO_EXTS", "Walk", "walk_videos", "summarize_skipped", "is_video_name"]

#: Video file extensions, in order of preference when several files share a name stem.
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".wmv",
              ".ts", ".mts", ".m2ts", ".m2t", ".m2v", ".vob", ".mxf", ".f4v", ".asf", ".3g2", ".mpe", ".divx",
              ".dv", ".qt", ".y4m", ".rm", ".rmvb")


@dataclass
class Walk:
    """Video files found (sorted paths, as reached from the root) and what was left out:
    ``skipped`` holds ``(path, reason)`` pairs."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def is_video_name(name: str) -> bool:
    """Whether a file name has a video extension (:data:`VIDEO_EXTS`, any case)."""
    return os.path.splitext(name)[1].lower() in VIDEO_EXTS


_is_video = is_video_name


def walk_videos(root: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = (), hidden: bool = False) -> Walk:
    """Every video file below ``root`` (recursively, following folder links, each real folder
    once), by extension (:data:`VIDEO_EXTS`, any case). Left out, with the reason: entries whose
    name starts with a dot (unless ``hidden``: e.g. macOS ``._clip.mp4`` resource files), files
    with another extension, broken links, unreadable folders, a folder reached again through a
    link (a cycle, or a second path to it), and the folders in ``exclude``.
    """
    root = Path(root)
    out = Walk()
    excluded = set()
    for p in exclude:
        try:
            st = os.stat(p)
            excluded.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    seen: dict[tuple[int, int], Path] = {}
    try:
        st = os.stat(root)
    except OSError as e:
        out.skipped.append((root, f"unreadable folder ({e.strerror})"))
        return out
    seen[(st.st_dev, st.st_ino)] = root
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            out.skipped.append((d, f"unreadable folder ({e.strerror})"))
            continue
        subdirs: list[Path] = []
        for e in entries:
            p = d / e.name
            if e.name.startswith(".") and not hidden:
                out.skipped.append((p, "hidden (name starts with a dot)"))
                continue
            try:
                is_dir = e.is_dir()  # follows links
                is_file = not is_dir and e.is_file()
            except OSError as err:
                out.skipped.append((p, f"unreadable ({err.strerror})"))
                continue
            if is_dir:
                try:
                    s = os.stat(p)
                except OSError as err:
                    out.skipped.append((p, f"unreadable folder ({err.strerror})"))
                    continue
                key = (s.st_dev, s.st_ino)
                if key in excluded:
                    continue  # e.g. the index being written inside the videos folder: not user data
                if key in seen:
                    out.skipped.append((p, f"folder already listed as {seen[key]} (link cycle or second path)"))
                    continue
                seen[key] = p
                subdirs.append(p)
            elif is_file:
                if _is_video(e.name):
                    out.files.append(p)
                else:
                    ext = os.path.splitext(e.name)[1].lower() or "no extension"
                    out.skipped.append((p, f"not a video extension ({ext})"))
            elif e.is_symlink():
                out.skipped.append((p, "broken link"))
            else:
                out.skipped.append((p, "not a regular file"))
        stack.extend(reversed(subdirs))  # depth first, in name order
    out.files.sort()
    return out


def summarize_skipped(skipped: list[tuple[Path, str]], examples: int = 3) -> list[str]:
    """One line per reason: ``"2 link cycle ...: a/loop, b/x"`` (file extensions grouped)."""
    by: dict[str, list[Path]] = {}
    for p, why in skipped:
        by.setdefault(why, []).append(p)
    lines = []
    for why, paths in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(str(p) for p in paths[:examples]) + (", ..." if len(paths) > examples else "")
        lines.append(f"{len(paths)} {why}: {shown}")
    return lines

