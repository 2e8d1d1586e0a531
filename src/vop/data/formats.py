"""Annotation formats: each adapter only parses its files into :class:`~vop.data.dataset.Record` s.

Directory layout of ``root`` (see docs/datasets.md):

- annotation files directly in ``root`` or in ``root/annotations/``;
- videos in ``root/videos/`` (or ``root`` itself when there is no ``videos`` folder), or in the
  folder given as ``videos_dir``. Each adapter first tries the exact path its dataset uses, then
  looks the file up by name stem anywhere under the videos folder (any video extension).

Malformed annotations raise :class:`~vop.errors.DataError` naming the file and the line (or the
JSON entry).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from vop.data.dataset import Record
from vop.data.files import VIDEO_EXTS, summarize_skipped, walk_videos
from vop.errors import DataError

__all__ = ["Layout", "VideoFinder", "DatasetFormat", "FORMATS", "VIDEO_EXTS", "load_records", "format_names"]

log = logging.getLogger("vop.data")


class VideoFinder:
    """Resolves video files under one folder: exact relative paths first, then by stem.

    The by-stem lookup walks the folder once (:func:`vop.data.files.walk_videos`: links to folders
    followed, each real folder once); what it left out is in ``skipped`` (``(path, reason)``)."""

    def __init__(self, videos_dir: Path):
        self.dir = videos_dir
        self._by_stem: dict[str, Path] | None = None
        self.skipped: list[tuple[Path, str]] = []

    def _stems(self) -> dict[str, Path]:
        if self._by_stem is None:
            walk = walk_videos(self.dir)
            self.skipped = walk.skipped
            problems = [(p, why) for p, why in walk.skipped if not why.startswith(("not a video", "hidden"))]
            if problems:
                log.warning("%s: left out while looking for videos: %s", self.dir, "; ".join(summarize_skipped(problems)))
            found: dict[str, list[Path]] = {}
            for f in walk.files:
                found.setdefault(f.name[: -len(f.suffix)], []).append(f)
            rank = {e: i for i, e in enumerate(VIDEO_EXTS)}
            self._by_stem = {
                s: min(ps, key=lambda p: (rank[p.suffix.lower()], str(p))) for s, ps in found.items()
            }
        return self._by_stem

    def find(self, *relative: str, stems: Iterable[str] = ()) -> Path:
        """The first existing ``videos_dir/relative``, else a file named ``<stem>.<video ext>``
        anywhere below; if none exists, the first candidate (so errors name the expected file)."""
        for rel in relative:
            p = self.dir / rel
            if p.is_file():
                return p
        for s in stems:
            hit = self._stems().get(s)
            if hit is not None:
                return hit
        return self.dir / relative[0]


@dataclass
class Layout:
    """Where a dataset's files are: ``root`` (annotations), ``videos`` (videos)."""

    root: Path
    videos: VideoFinder
    annotations: Path | None = None  # an explicit annotation file (collection format)

    @classmethod
    def of(cls, root: str | os.PathLike, videos_dir: str | os.PathLike | None = None,
           annotations: str | os.PathLike | None = None) -> "Layout":
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: dataset root folder not found")
        if videos_dir is None:
            videos_dir = root / "videos" if (root / "videos").is_dir() else root
        elif not Path(videos_dir).is_dir():
            raise DataError(f"{videos_dir}: videos folder not found")
        return cls(root, VideoFinder(Path(videos_dir)), Path(annotations) if annotations else None)

    def find_file(self, *names: str) -> Path | None:
        """The first of ``names`` found in ``root`` or ``root/annotations``."""
        for name in names:
            for d in (self.root, self.root / "annotations"):
                if (d / name).is_file():
                    return d / name
        return None

    def file(self, *names: str) -> Path:
        """Like :meth:`find_file`, but a missing file is an error."""
        path = self.find_file(*names)
        if path is None:
            raise DataError(f"{self.root}: annotation file {' or '.join(names)} not found "
                            f"(looked in {self.root} and {self.root / 'annotations'})")
        return path


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, line without the newline) of a UTF-8 text file, blank lines skipped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield n, line
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise DataError(f"{where}: {what}")


def _str_field(obj: Any, key: str, where: str) -> str:
    _expect(isinstance(obj, dict) and isinstance(obj.get(key), str), where, f"expected an object with a string {key!r}")
    return obj[key]


# --------------------------------------------------------------------------------------------
# MSR-VTT


def _msrvtt_path(layout: Layout, vid: str) -> Path:
    return layout.videos.find(*(vid + e for e in (".mp4", ".webm", ".mkv", ".avi")), stems=[vid])


def _load_msrvtt(layout: Layout, split: str) -> list[Record]:
    if split == "test":
        path = layout.file("MSRVTT_JSFUSION_test.csv")
        rows = iter(_csv_rows(path))
        n, header = next(rows, (1, []))
        _expect(header[:1] == ["key"] and "video_id" in header and "sentence" in header, f"{path}:{n}",
                "expected the header key,vid_key,video_id,sentence")
        vcol, scol = header.index("video_id"), header.index("sentence")
        out = []
        for n, row in rows:
            _expect(len(row) >= len(header), f"{path}:{n}", f"expected {len(header)} comma-separated fields, found {len(row)}")
            sentence = ",".join(row[scol:]) if scol == len(header) - 1 else row[scol]  # unquoted commas
            vid = row[vcol].strip()
            out.append(Record(vid, _msrvtt_path(layout, vid), sentence.strip(), {"line": n}))
        return out
    list_path = layout.file(f"MSRVTT_train.{split}.csv")
    rows = list(_csv_rows(list_path))
    _expect(bool(rows) and rows[0][1][:1] == ["video_id"], f"{list_path}:1", "expected the header video_id")
    wanted = {r[0].strip() for _, r in rows[1:] if r}
    data_path = layout.file("MSRVTT_data.json")
    data = _read_json(data_path)
    _expect(isinstance(data, dict) and isinstance(data.get("sentences"), list), str(data_path),
            "expected an object with a 'sentences' list")
    out, paths = [], {}
    for i, s in enumerate(data["sentences"]):
        where = f"{data_path}: sentences[{i}]"
        vid, caption = _str_field(s, "video_id", where), _str_field(s, "caption", where)
        if vid in wanted:
            if vid not in paths:
                paths[vid] = _msrvtt_path(layout, vid)
            out.append(Record(vid, paths[vid], caption.strip()))
    return out


def _csv_rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Rows of a comma-separated file with their line numbers (standard CSV quoting)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                if row and any(c.strip() for c in row):
                    yield reader.line_num, row
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as CSV ({e})") from None


# --------------------------------------------------------------------------------------------
# DiDeMo


def _load_didemo(layout: Layout, split: str) -> list[Record]:
    path = layout.file(f"{split}_data.json")
    data = _read_json(path)
    _expect(isinstance(data, list), str(path), "expected a JSON list of moments")
    texts: dict[str, list[str]] = {}
    for i, m in enumerate(data):
        where = f"{path}: entry {i}"
        texts.setdefault(_str_field(m, "video", where), []).append(_str_field(m, "description", where).strip())
    order = list(texts)  # without a split list: every video of the json file
    list_path = layout.find_file(f"{split}_list.txt")
    if list_path is not None:
        order = [line.strip() for _, line in _lines(list_path) if line.strip() in texts]
    return [
        Record(name, layout.videos.find(name, stems=[os.path.splitext(name)[0], name]),
               " ".join(t for t in texts[name] if t))
        for name in order
    ]


# --------------------------------------------------------------------------------------------
# ActivityNet Captions


def _load_activitynet(layout: Layout, split: str) -> list[Record]:
    path = layout.file(f"{split}.json")
    data = _read_json(path)
    _expect(isinstance(data, dict), str(path), 'expected an object keyed "v_<youtube id>"')
    ids_name = {"train": "train_ids.json", "val_1": "val_ids.json"}[split]
    keys = list(data)
    ids_path = layout.find_file(ids_name)
    if ids_path is not None:  # only ids with captions become samples
        ids = _read_json(ids_path)
        _expect(isinstance(ids, list), str(ids_path), "expected a JSON list of ids")
        keys = [k for k in ids if k in data]
    out = []
    for key in keys:
        where = f"{path}: {key!r}"
        sentences = data[key].get("sentences") if isinstance(data[key], dict) else None
        _expect(isinstance(sentences, list) and all(isinstance(s, str) for s in sentences), where,
                "expected a 'sentences' list of strings")
        yid = key[2:] if key.startswith("v_") else key
        video = layout.videos.find(f"{yid}.mp4", stems=[yid, key])
        out.append(Record(key, video, " ".join(s.strip() for s in sentences if s.strip())))
    return out


# --------------------------------------------------------------------------------------------
# LSMDC

_LSMDC_TIME = re.compile(r"_\d{2}\.\d{2}\.\d{2}\.\d+-\d{2}\.\d{2}\.\d{2}\.\d+$")


def lsmdc_movie(clip_id: str) -> str | None:
    """The movie folder of a clip id: the id up to its ``_HH.MM.SS.mmm-HH.MM.SS.mmm`` suffix."""
    m = _LSMDC_TIME.search(clip_id)
    return clip_id[: m.start()] if m else None


def _load_lsmdc(layout: Layout, split: str) -> list[Record]:
    name = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
            "test": "LSMDC16_challenge_1000_publictect.csv"}[split]
    path = layout.file(name)
    out, paths = [], {}
    for n, line in _lines(path):
        fields = line.split("\t")
        _expect(len(fields) == 6, f"{path}:{n}", f"expected 6 tab-separated fields, found {len(fields)}")
        clip = fields[0].strip()
        if clip not in paths:
            movie = lsmdc_movie(clip)
            rel = [f"{movie}/{clip}.avi"] if movie else []
            paths[clip] = layout.videos.find(*rel, f"{clip}.avi", stems=[clip])
        out.append(Record(clip, paths[clip], fields[5].strip(), {"line": n}))
    return out


# --------------------------------------------------------------------------------------------
# Generic collection (CSV or JSONL: video, caption, optional split, any extra columns)

COLLECTION_FILES = ("captions.jsonl", "captions.csv", "annotations.jsonl", "annotations.csv")


def _collection_rows(path: Path) -> Iterable[tuple[int, dict]]:
    if path.suffix.lower() == ".csv":
        rows = iter(_csv_rows(path))
        n, header = next(rows, (1, []))
        header = [h.strip() for h in header]
        for n, row in rows:
            _expect(len(row) == len(header), f"{path}:{n}", f"expected {len(header)} fields, found {len(row)}")
            yield n, dict(zip(header, row))
    else:
        for n, line in _lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            _expect(isinstance(obj, dict), f"{path}:{n}", "expected a JSON object per line")
            yield n, obj


def _collection_path(layout: Layout, video: str) -> Path:
    """``video`` relative to the root (or to an explicit videos folder); absolute paths as given."""
    candidates = [layout.root / video, layout.videos.dir / video]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _load_collection(layout: Layout, split: str) -> list[Record]:
    path = layout.annotations or layout.file(*COLLECTION_FILES)
    out, seen_splits, has_split = [], set(), False
    for n, row in _collection_rows(path):
        where = f"{path}:{n}"
        video, caption = _str_field(row, "video", where), _str_field(row, "caption", where)
        _expect(bool(video.strip()) and bool(caption.strip()), where, "empty 'video' or 'caption'")
        row_split = row.get("split")
        if row_split not in (None, ""):
            has_split = True
            seen_splits.add(str(row_split))
        if split != "all" and str(row_split) != split:
            continue
        meta = {k: v for k, v in row.items() if k not in ("video", "caption")}
        meta["line"] = n
        out.append(Record(video, _collection_path(layout, video), caption.strip(), meta))
    if split != "all" and not out:
        have = ", ".join(sorted(seen_splits)) if has_split else "none (no 'split' column)"
        raise DataError(f"{path}: no row of split {split!r}; splits present: {have}; use split 'all' for every row")
    return out


# --------------------------------------------------------------------------------------------
# The format table


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset format: its splits (accepted name -> canonical), default frame count, loader."""

    name: str
    load: Callable[[Layout, str], list[Record]]
    splits: dict[str, str]
    train_splits: frozenset[str]
    frames: int = 12  # default frames per video
    paragraph: bool = False  # captions are paragraphs (the field uses 64 words and 64 frames)
    any_split: bool = False  # the user's own collection: any split name is accepted (rows carry it)
    default_split: str = "test"  # what `vop data verify|cache` check without --split: the evaluation split

    def canonical_split(self, split: str) -> str:
        if split in self.splits:
            return self.splits[split]
        if self.any_split:
            return split
        raise DataError(f"dataset {self.name!r} has no split {split!r}; choose one of {', '.join(self.splits)}")


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in [
        DatasetFormat("msrvtt", _load_msrvtt,
                      {"9k": "9k", "7k": "7k", "train": "9k", "test": "test", "1k-A": "test"},
                      frozenset({"9k", "7k"})),
        DatasetFormat("didemo", _load_didemo, {"train": "train", "val": "val", "test": "test"},
                      frozenset({"train"}), frames=64, paragraph=True),
        DatasetFormat("activitynet", _load_activitynet,
                      {"train": "train", "val_1": "val_1", "val": "val_1", "test": "val_1"},
                      frozenset({"train"}), frames=64, paragraph=True, default_split="val_1"),
        DatasetFormat("lsmdc", _load_lsmdc, {"train": "train", "val": "val", "test": "test"}, frozenset({"train"})),
        DatasetFormat("collection", _load_collection, {"all": "all", "train": "train", "val": "val", "test": "test"},
                      frozenset({"train"}), any_split=True, default_split="all"),
    ]
}


def format_names() -> str:
    """The dataset format names as help texts list them: ``msrvtt, didemo, ... lsmdc or collection``."""
    *first, last = FORMATS
    return f"{', '.join(first)} or {last}"


def get_format(name: str) -> DatasetFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(FORMATS)}") from None


def load_records(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    videos_dir: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> tuple[list[Record], str]:
    """Parse the annotations of ``name``/``split``: ``(records, canonical split)``.

    Records keep their expected video path even when the file is missing. ``skipped``: a list that
    receives what the by-stem lookup left out of the videos folder (``(path, reason)``), if it ran.
    """
    fmt = get_format(name)
    split = fmt.canonical_split(split)
    layout = Layout.of(root, videos_dir, annotations)
    records = fmt.load(layout, split)
    if skipped is not None:
        skipped.extend(layout.videos.skipped)
    return records, split
