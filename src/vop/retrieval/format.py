"""The on-disk format of a video index: layout, ``index.json`` and its checks, checksums, safe reading,
and writing a generation.

Layout of an index folder::

    INDEX/index.json            format, model (checkpoint path + SHA-256 + metadata, backbone, ``files``:
                                size + SHA-256 of the checkpoint and backbone files), settings, counts,
                                failed/missing videos, FAISS settings, current file names, ``checksums``
                                (size + SHA-256 of each file below), ``scoring`` (kind, row shape, whether
                                FAISS applies; also ``pairwise`` and ``frames_per_video``, as written before)
    INDEX/embeddings-<g>.npy    float32 (N, *row_shape), row i = line i of videos-<g>.jsonl: (N, D) L2-normalised
                                for a dual encoder (kind ``cosine``); (N, F, D) raw per-frame embeddings for
                                cma's query score (kind ``qscore``)
    INDEX/videos-<g>.jsonl      id, path, size, mtime_ns[, sha256], duration, num_frames, fps, width,
                                height, frame_indices, thumb[, captions]
    INDEX/thumbs/*.jpg          frame strips (PNG where FFmpeg has no JPEG encoder)
    INDEX/faiss-<g>.index       optional approximate index (see vop.retrieval.ann)
    INDEX/rerank-<g>.npy        IVF-PQ's float16 copy of the rows its candidates are re-ranked with (optional)
    INDEX/parts/                encoded batches of a run in progress (picked up by the next run)

An index whose rows live in a Milvus collection (``vop index --store milvus://...``, format
``vop-index/2``: an older vop refuses it by name) has no ``embeddings-<g>.npy`` nor ``faiss-<g>.index``;
its ``index.json`` records the store (``store``: URI, collection, the index's UUID, the collection's vector
index and dimension), which is checked against the collection when the index opens
(:mod:`vop.retrieval.milvus`).

``<g>`` is a generation number: :func:`write_index` writes new files, then replaces ``index.json``
atomically, then removes the old generation, so a reader never sees embeddings and metadata of
different runs. A new index is built in ``.INDEX.vop-building`` next to ``INDEX``
(:func:`building_path`) and renamed when complete (vop.retrieval.build).

Integrity (docs/search.md, "Integrity"): :func:`read_index` checks ``index.json`` field by field
(:func:`check_meta`), the ``.npy`` header (dtype, shape, size) before reading any data, and the
recorded SHA-256 of every file while reading it (``verify=False`` skips the hashing; embeddings larger than
:data:`MMAP_FROM` bytes are hashed in a pass over the file, then memory-mapped, never read into memory); damage is a
DataError naming the file and the command that rebuilds the index (:func:`rebuild_command`). Indexes
written before checksums open with a warning and a NaN/inf scan; indexes written before ``scoring``
was recorded are read from their ``pairwise`` field (:class:`StoredScoring`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vop.errors import ConfigError, DataError
from vop.scoring import index_label

__all__ = ["FORMAT", "FORMAT_REMOTE", "FORMATS", "StoredScoring", "read_meta", "check_meta", "check_model_record", "read_index", "write_index",
           "rebuild_command", "sha256_file", "file_record", "building_path", "atomic_write", "next_generation", "MMAP_FROM"]

FORMAT = "vop-index/1"          # rows in the folder (the faiss store)
FORMAT_REMOTE = "vop-index/2"   # rows in an external store (Milvus); the folder keeps index.json, the video list, thumbnails
FORMATS = (FORMAT, FORMAT_REMOTE)
#: embeddings files of at least this many bytes are memory-mapped when an index opens, not read into memory
#: (4 GiB: 2M videos of 512 floats); the IVF-PQ of a larger collection then re-ranks from a float16 copy
MMAP_FROM = 4 << 30
log = logging.getLogger("vop.retrieval")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike, role: str | None = None) -> dict[str, Any]:
    """What an index records of a file it depends on: size and SHA-256 of its bytes (and its role and
    absolute path for a model file)."""
    p = Path(path)
    st = p.stat()
    rec: dict[str, Any] = {"role": role, "path": str(p.resolve()), "mtime_ns": st.st_mtime_ns} if role else {}
    rec.update(size=st.st_size, sha256=sha256_file(p))
    return rec


def rebuild_command(path: str | os.PathLike, meta: Any = None, checkpoint: Any = None) -> str:
    """The `vop index` command that rebuilds the index at ``path`` from what its ``index.json`` (if
    readable) records: its source, split, checkpoint (or ``checkpoint``) and backbone."""
    import shlex

    meta = meta if isinstance(meta, dict) else {}
    src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    videos = src.get("videos") if isinstance(src.get("videos"), str) else "VIDEOS"
    ckpt = model.get("checkpoint") if isinstance(model.get("checkpoint"), str) else "CHECKPOINT"
    other = checkpoint is not None and str(checkpoint) != ckpt
    ckpt = str(checkpoint) if other else ckpt
    cmd = ["vop", "index", "--videos", shlex.quote(videos)]
    if isinstance(src.get("split"), str) and src["split"] != "all":
        cmd += ["--split", shlex.quote(src["split"])]
    cmd += ["--checkpoint", shlex.quote(ckpt)]
    store = meta.get("store") if isinstance(meta.get("store"), dict) else {}
    if store.get("kind") == "milvus" and isinstance(store.get("uri"), str):
        cmd += ["--store", shlex.quote(store["uri"])]
    ck_meta = model.get("checkpoint_meta") if isinstance(model.get("checkpoint_meta"), dict) else {}
    bb = model.get("backbone")
    if isinstance(bb, str) and bb != ck_meta.get("backbone") and not other:
        cmd += ["--backbone", shlex.quote(bb)]
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    for key, flag in (("frames", "--frames"), ("image_size", "--image-size")):
        v = settings.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and (key != "frames" or v != model.get("frames")) and not other:
            cmd += [flag, str(v)]
    return " ".join(cmd + ["--out", shlex.quote(str(path)), "--rebuild"])


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file and a rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_lines(path: Path, lines) -> None:
    """The text ``lines`` (UTF-8) into ``path`` like :func:`atomic_write`, written in blocks of 65,536 lines: a
    10M-video list never sits in memory as one string (1.6 GB of peak memory saved at 10M)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        block: list[str] = []
        for line in lines:
            block.append(line)
            if len(block) >= 65536:
                f.write("".join(block).encode("utf-8"))
                block.clear()
        f.write("".join(block).encode("utf-8"))
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, arr: np.ndarray, dtype: Any = np.float32) -> None:
    """``arr`` as a ``.npy`` of ``dtype`` through a temporary file and a rename, written in chunks of rows (a
    memory-mapped ``arr`` larger than memory is never copied whole)."""
    from numpy.lib import format as npy

    from vop.retrieval.ann import iter_rows

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    dtype = np.dtype(dtype)
    with open(tmp, "wb") as f:
        if arr.ndim < 2 or len(arr) == 0:
            np.save(f, np.ascontiguousarray(arr, dtype=dtype))
        else:
            npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False,
                                            "shape": tuple(int(x) for x in arr.shape)})
            step = max(1, _READ_CHUNK // max(1, arr[0].nbytes))
            for _, part in iter_rows(arr, step):
                f.write(part.astype(dtype, copy=False).tobytes())
    os.replace(tmp, path)


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(v: Any, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def check_model_record(info: Any, where: str, rebuild: str = "vop index ... --rebuild") -> dict[str, Any]:
    """The ``model`` record of an index (``where``: its index.json), its fields' types checked before
    they are used: a DataError naming the field otherwise."""
    def bad(field: str, want: str) -> DataError:
        return DataError(f"{where}: field 'model.{field}' is missing or damaged (expected {want}); the index is damaged: "
                         f"rebuild it: {rebuild}")

    if not isinstance(info, dict):
        raise bad("", "an object")
    for key, ok, want in (
        ("checkpoint", lambda v: isinstance(v, str) and v, "a path"),
        ("checkpoint_sha256", lambda v: isinstance(v, str) and _HEX64.fullmatch(v), "64 hex digits"),
        ("method", lambda v: isinstance(v, str), "a method name"),
        ("backbone", lambda v: v is None or isinstance(v, str), "a path, a name or null"),
        ("checkpoint_meta", lambda v: isinstance(v, dict), "an object"),
        ("files", lambda v: v is None or (isinstance(v, list) and all(
            isinstance(f, dict) and isinstance(f.get("role"), str) and isinstance(f.get("path"), str)
            and _is_int(f.get("size")) and isinstance(f.get("sha256"), str) and _HEX64.fullmatch(f["sha256"])
            and (f.get("mtime_ns") is None or _is_int(f["mtime_ns"])) for f in v)), "a list of {role, path, size, sha256}"),
    ):
        if not ok(info.get(key)):
            raise bad(key, want)
    cm = info["checkpoint_meta"]
    for key, ok, want in (("method", lambda v: isinstance(v, str), "a method name"),
                          ("options", lambda v: isinstance(v, dict), "an object"),
                          ("frames", lambda v: _is_int(v, 1), "an integer >= 1"),
                          ("arch", lambda v: isinstance(v, dict), "an object")):
        if not ok(cm.get(key)):
            raise bad(f"checkpoint_meta.{key}", want)
    return info

@dataclass(frozen=True)
class StoredScoring:
    """How an index's rows are scored (index.json's ``scoring``): the kind (a model that searches the index
    must score that kind: ``model.scoring.kind``), one video's row shape ((D,) or (F, D)) and whether an
    approximate inner-product index (FAISS) applies."""

    kind: str
    row_shape: tuple[int, ...]
    ann: bool

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "StoredScoring":
        """From a checked index.json. One written before ``scoring`` was recorded is read from its legacy
        ``pairwise`` field, which only cma's query score set: rows (frames_per_video, dim)."""
        rec = meta.get("scoring")
        if rec is not None:
            return cls(rec["kind"], tuple(rec["row_shape"]), bool(rec["ann"]))
        if meta.get("pairwise"):
            return cls("qscore", (meta["frames_per_video"], meta["dim"]), False)
        return cls("cosine", (meta["dim"],), True)

    def fields(self) -> dict[str, Any]:
        """Its index.json fields: ``scoring``, and the legacy ``pairwise`` (+ ``frames_per_video``) that vop
        wrote before, for older readers."""
        legacy = len(self.row_shape) == 2 and not self.ann
        out: dict[str, Any] = {"scoring": {"kind": self.kind, "row_shape": list(self.row_shape), "ann": self.ann},
                               "pairwise": legacy}
        if legacy:
            out["frames_per_video"] = self.row_shape[0]
        return out

    def describe(self) -> dict[str, Any]:
        """What the search API says of it: the kind, and the legacy ``pairwise`` flag."""
        return {"scoring": self.kind, "pairwise": self.fields()["pairwise"]}

    @property
    def label(self) -> str:
        """What the index is, for messages ("a dual-encoder index (one vector per video)", ...)."""
        return index_label(self.kind, self.row_shape)


_KIND = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def read_meta(path: Path) -> dict[str, Any] | None:
    """``path/index.json``, its fields checked (:func:`check_meta`); None if there is none."""
    f = path / "index.json"
    if not f.is_file():
        return None
    try:
        meta = _STRICT_JSON.decode(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: not valid JSON ({e}); the index is damaged: rebuild it: {rebuild_command(path)}") from None
    return check_meta(f, meta)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)  # one decoder: json.loads(..., kwargs) builds one per call


def check_meta(f: Path, meta: Any) -> dict[str, Any]:
    """The fields of an index.json (``f``) that reading and searching use, with their types: a DataError
    naming the first damaged one (never a KeyError later)."""
    if not isinstance(meta, dict):
        raise DataError(f"{f}: holds {type(meta).__name__}, not an index description; the index is damaged: "
                        f"rebuild it: {rebuild_command(f.parent)}")
    if meta.get("format") not in FORMATS:
        raise DataError(f"{f}: unknown index format {meta.get('format')!r} (expected {' or '.join(FORMATS)}: "
                        "written by a newer vop? upgrade vop)")
    remote = meta["format"] == FORMAT_REMOTE

    def bad(field: str, want: str) -> DataError:
        v = field.split(".")
        got: Any = meta
        for part in v:
            got = got.get(part, "<missing>") if isinstance(got, dict) else "<missing>"
        shown = got if got == "<missing>" else repr(got)[:60]
        return DataError(f"{f}: field {field!r} is {shown}, expected {want}; the index is damaged: rebuild it: "
                         f"{rebuild_command(f.parent, meta)}")

    def name(v: Any) -> bool:
        return isinstance(v, str) and bool(_NAME.fullmatch(v))

    for key, ok, want in (
        ("generation", lambda v: _is_int(v, 1), "an integer >= 1"),
        ("dim", lambda v: _is_int(v, 1), "an integer >= 1"),
        ("count", lambda v: _is_int(v), "an integer >= 0"),
        ("pairwise", lambda v: v is None or isinstance(v, bool), "true or false"),
        ("scoring", lambda v: v is None or isinstance(v, dict), "an object {kind, row_shape, ann}"),
        ("model", lambda v: isinstance(v, dict), "an object"),
        ("settings", lambda v: isinstance(v, dict), "an object"),
        ("files", lambda v: isinstance(v, dict), "an object"),
        ("faiss", lambda v: v is None or (isinstance(v, dict) and not remote), "null or an object"),
        ("store", lambda v: (isinstance(v, dict) and v.get("kind") == "milvus") if remote else
         (v is None or (isinstance(v, dict) and v.get("kind") == "faiss")), "the store record {kind, uri, collection, ...}"),
        ("ann", lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("choice"), str)
                                        and isinstance(v.get("params", {}), dict)), "an object {choice, params}"),
        ("failed", lambda v: v is None or (isinstance(v, list) and all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in v)),
         "a list of {id, ...}"),
        ("missing", lambda v: v is None or isinstance(v, list), "a list"),
        ("checksums", lambda v: v is None or (isinstance(v, dict) and all(
            name(k) and isinstance(c, dict) and _is_int(c.get("size")) and isinstance(c.get("sha256"), str)
            and bool(_HEX64.fullmatch(c["sha256"])) for k, c in v.items())), "an object {file: {size, sha256}}"),
    ):
        if not ok(meta.get(key)):
            raise bad(key, want)
    sc = meta.get("scoring")
    if sc is not None:
        if not (isinstance(sc.get("kind"), str) and _KIND.fullmatch(sc["kind"])):
            raise bad("scoring.kind", "the name of a kind of scores (cosine, qscore, ...)")
        rs = sc.get("row_shape")
        if not (isinstance(rs, list) and 1 <= len(rs) <= 4 and all(_is_int(n, 1) for n in rs) and rs[-1] == meta["dim"]):
            raise bad("scoring.row_shape", f"a list of 1 to 4 integers >= 1 ending with the dimension {meta['dim']}")
        if not isinstance(sc.get("ann"), bool) or (sc["ann"] and len(rs) != 1):
            raise bad("scoring.ann", "true (one vector per video) or false")
    elif meta.get("pairwise") and not _is_int(meta.get("frames_per_video"), 1):
        raise bad("frames_per_video", "an integer >= 1 (a pairwise index)")
    if remote:
        st = meta["store"]
        for key, ok, want in (
            ("uri", lambda v: isinstance(v, str) and v.startswith("milvus://"), "a milvus:// URI"),
            ("collection", lambda v: isinstance(v, str) and bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", v)),
             "a collection name"),
            ("uuid", lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9a-f]{32}", v)), "32 hex digits"),
            ("lite", lambda v: v is None or isinstance(v, str), "null or a path"),
            ("host", lambda v: v is None or isinstance(v, str), "null or a host name"),
            ("port", lambda v: v is None or _is_int(v, 1), "null or a port"),
            ("index", lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str) and isinstance(v.get("params"), dict),
             "an object {kind, params}"),
        ):
            if not ok(st.get(key)):
                raise bad(f"store.{key}", want)
        if (st["lite"] is None) == (st["host"] is None):
            raise bad("store.lite", "a Milvus Lite file or a host (one of them)")
        if not StoredScoring.of(meta).ann:
            raise bad("store", f"the faiss store ({StoredScoring.of(meta).label} keeps its rows in the folder)")
    files = meta["files"]
    for key in ((("videos",) if remote else ("embeddings", "videos")) + (("faiss",) if meta.get("faiss") else ())
                + (("rerank",) if "rerank" in files else ())):
        if not name(files.get(key)):
            raise bad(f"files.{key}", "a file name in the index folder")
    fa = meta.get("faiss")
    if fa:
        from vop.retrieval.ann import KINDS

        if fa.get("kind") not in KINDS:
            raise bad("faiss.kind", " or ".join(KINDS))
        if not isinstance(fa.get("params"), dict):
            raise bad("faiss.params", "an object")
        stored = StoredScoring.of(meta)
        if not stored.ann:
            raise bad("faiss", f"null ({stored.label} has no FAISS index: its search is exact)")
    mw = meta["settings"].get("max_words")
    if mw is not None and not _is_int(mw, 1):
        raise bad("settings.max_words", "an integer >= 1")
    sums = meta.get("checksums")
    if sums is not None:
        for key in ((("videos",) if remote else ("embeddings", "videos")) + (("faiss",) if fa else ())
                    + (("rerank",) if "rerank" in files else ())):
            if files[key] not in sums:
                raise bad(f"checksums.{files[key]}", "the size and SHA-256 of that file")
    return meta


def _checksum(sums: dict | None, name: str) -> dict | None:
    return None if sums is None else sums[name]


def _damaged(file: Path, problem: str, hint: str) -> DataError:
    return DataError(f"{file}: {problem}; the index is damaged: rebuild it: {hint}")


def _open_file(file: Path, hint: str):
    try:
        return open(file, "rb")
    except FileNotFoundError:
        raise _damaged(file, "missing", hint) from None
    except OSError as e:
        raise _damaged(file, f"cannot be read ({e.strerror or e})", hint) from None


def _size_check(file: Path, size: int, want: dict | None, hint: str) -> None:
    if size == 0:
        raise _damaged(file, "empty (0 bytes)", hint)
    if want is not None and size != want["size"]:
        raise _damaged(file, f"{size:,} bytes, {want['size']:,} when the index was written (truncated or replaced)", hint)


def _verify_file(file: Path, want: dict, hint: str) -> None:
    """Size and SHA-256 of ``file`` against its record in index.json."""
    with _open_file(file, hint) as f:
        _size_check(file, os.fstat(f.fileno()).st_size, want, hint)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != want["sha256"]:
        raise _damaged(file, f"its SHA-256 differs from the one recorded when the index was written "
                             f"({want['sha256'][:12]}...): its bytes changed (a flipped bit, or another file)", hint)


_READ_CHUNK = 1 << 24


def _read_npy(file: Path, shape: tuple[int, ...], want: dict | None, hint: str) -> np.ndarray:
    """A float32 C-order ``.npy`` of exactly ``shape``: its header parsed without evaluating anything
    (numpy's header reader, any error caught), dtype, order, shape and file size checked before
    anything is allocated or read; then the data read in one pass, hashed against ``want`` (size +
    SHA-256 of the whole file) when given."""
    from numpy.lib import format as npy

    with _open_file(file, hint) as f:
        size = os.fstat(f.fileno()).st_size
        _size_check(file, size, want, hint)
        try:
            version = npy.read_magic(f)
            if version == (1, 0):
                hshape, fortran, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                hshape, fortran, dtype = npy.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as e:  # ValueError, SyntaxError, tokenize.TokenError, EOFError, ...: a damaged header
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise _damaged(file, f"not a readable .npy array (damaged header: {reason})", hint) from None
        offset = f.tell()
        if dtype != np.dtype("<f4") or fortran:
            raise _damaged(file, f"holds {'Fortran-order ' if fortran else ''}{dtype} values, expected little-endian float32", hint)
        if tuple(hshape) != tuple(shape):
            raise _damaged(file, f"holds an array of shape {tuple(hshape)}, index.json records {tuple(shape)}", hint)
        need = offset + 4 * math.prod(shape)  # Python ints: no overflow for an absurd recorded shape
        if size != need:
            problem = (f"truncated: {size:,} bytes, its {tuple(shape)} float32 array needs {need:,}" if size < need
                       else f"{size - need:,} bytes longer than its {tuple(shape)} float32 array")
            raise _damaged(file, problem, hint)
        if size >= MMAP_FROM and math.prod(shape):
            if want is not None:  # hashed in a pass over the file (no copy kept), then mapped
                f.seek(0)
                h = hashlib.sha256()
                for block in iter(lambda: f.read(_READ_CHUNK), b""):
                    h.update(block)
                if h.hexdigest() != want["sha256"]:
                    raise _damaged(file, f"its SHA-256 differs from the one recorded when the index was written "
                                         f"({want['sha256'][:12]}...): its bytes changed (a flipped bit, or another file)", hint)
            return np.memmap(file, dtype=np.dtype("<f4"), mode="r", offset=offset, shape=tuple(shape))
        arr = np.empty(shape, np.dtype("<f4"))
        h = None
        if want is not None:
            h = hashlib.sha256()
            f.seek(0)
            h.update(f.read(offset))
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(buf):
            n = f.readinto(buf[pos:pos + _READ_CHUNK])
            if not n:
                raise _damaged(file, f"truncated while being read ({offset + pos:,} of {need:,} bytes)", hint)
            if h is not None:
                h.update(buf[pos:pos + n])
            pos += n
    if h is not None and h.hexdigest() != want["sha256"]:
        raise _damaged(file, f"its SHA-256 differs from the one recorded when the index was written ({want['sha256'][:12]}...): "
                             "its bytes changed (a flipped bit, or another file)", hint)
    return arr


def _check_finite(file: Path, arr: np.ndarray, entries: list[dict], hint: str) -> None:
    """Every value of ``arr`` finite, else a DataError naming the video of the first bad row."""
    step = max(1, _READ_CHUNK // max(1, arr[0].nbytes)) if len(arr) else 1
    for s0 in range(0, len(arr), step):
        part = arr[s0:s0 + step]
        ok = np.isfinite(part.reshape(len(part), -1)).all(1)
        if not ok.all():
            bad = np.flatnonzero(~ok) + s0
            more = f" (and {len(bad) - 1} more rows near it)" if len(bad) > 1 else ""
            raise _damaged(file, f"row {int(bad[0])} (video {entries[int(bad[0])]['id']!r}) holds NaN or inf values{more}", hint)


def _read_entries(file: Path, count: int, want: dict | None, hint: str) -> list[dict[str, Any]]:
    """The ``videos-G.jsonl`` lines: one JSON object per video (id and path strings), ``count`` of them."""
    with _open_file(file, hint) as f:
        data = f.read()
    if want is not None:
        _size_check(file, len(data), want, hint)
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise _damaged(file, f"its SHA-256 differs from the one recorded when the index was written "
                                 f"({want['sha256'][:12]}...): its bytes changed", hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _damaged(file, f"not UTF-8 text (byte {e.start})", hint) from None
    entries = []
    decode = _STRICT_JSON.decode
    for i, line in enumerate(text.split("\n"), 1):
        if not line or line.isspace():
            continue
        try:
            e = decode(line)
        except ValueError as err:
            raise _damaged(file, f"line {i} is not valid JSON ({err})", hint) from None
        if type(e) is not dict or type(e.get("id")) is not str or type(e.get("path")) is not str:
            raise _damaged(file, f"line {i} is not a video entry (an object with id and path)", hint)
        entries.append(e)
    if len(entries) != count:
        raise _damaged(file, f"lists {len(entries)} videos, index.json records {count}", hint)
    return entries

def read_index(path: Path, *, verify: bool = True) -> tuple[dict[str, Any], np.ndarray | None, list[dict[str, Any]]]:
    """(index.json, rows (N, *row_shape) float32, video entries) of the index at ``path``, every check of
    the module docstring done: index.json field by field, the embeddings' header (dtype, shape: the
    count and row shape index.json records) and size before any data is read; with ``verify`` every file
    against the SHA-256 recorded when it was written (an index of an older vop, without checksums: its
    embeddings are checked for NaN/inf instead, with a warning); the FAISS file's presence (and checksum).
    Any damage is a DataError naming the file and the command that rebuilds the index. An index whose rows
    are in an external store (format ``vop-index/2``): rows None (its store checks them when it opens)."""
    meta = read_meta(path)
    if meta is None:
        raise DataError(f"{path}: not a vop index (no index.json); build one with `vop index --videos DIR --checkpoint CKPT --out {path}`")
    files, sums = meta["files"], meta.get("checksums")
    hint = rebuild_command(path, meta)
    if verify and sums is None:
        log.warning("%s: built by an older vop: its files carry no checksums, so damage to them cannot be detected "
                    "(only NaN/inf is checked); running its `vop index` command again adds them", path)
    check = sums if verify else None
    if meta["format"] == FORMAT_REMOTE:
        return meta, None, _read_entries(path / files["videos"], meta["count"], _checksum(check, files["videos"]), hint)
    shape = (meta["count"], *StoredScoring.of(meta).row_shape)
    emb_file = path / files["embeddings"]
    # the embeddings are read (and hashed: hashlib and file reads release the GIL) in a second thread
    # while this one parses the video list: verifying costs little more than reading
    with ThreadPoolExecutor(1, thread_name_prefix="vop-index-read") as pool:
        emb_read = pool.submit(_read_npy, emb_file, shape, _checksum(check, files["embeddings"]), hint)
        entries = _read_entries(path / files["videos"], meta["count"], _checksum(check, files["videos"]), hint)
        emb = emb_read.result()
    if verify and sums is None:  # no checksum: at least no NaN/inf
        _check_finite(emb_file, emb, entries, hint)
    if meta.get("faiss"):
        f = path / files["faiss"]
        if not f.is_file():
            raise DataError(f"{f}: missing (index.json names it as the FAISS index); the index is damaged: rebuild it: {hint}")
        want = _checksum(check, files["faiss"])
        if want is not None:
            _verify_file(f, want, hint)
    if files.get("rerank"):
        f = path / files["rerank"]
        if not f.is_file():
            raise DataError(f"{f}: missing (index.json names it as the IVF-PQ's re-ranking vectors); the index is damaged: "
                            f"rebuild it: {hint}")
        want = _checksum(check, files["rerank"])
        if want is not None:
            _verify_file(f, want, hint)
    return meta, emb, entries


_BUILDING = ".vop-building"


def building_path(out: str | os.PathLike) -> Path:
    """Where a new index is built (next to ``out``, hidden) before it is renamed to ``out``; a run
    killed midway leaves its encoded parts there, and the next run goes on from them."""
    out = Path(out)
    return out.parent / f".{out.name}{_BUILDING}"


def next_generation(old: dict[str, Any] | None) -> int:
    """The generation number a new write of an index whose index.json is ``old`` gets."""
    return int(old.get("generation", 0)) + 1 if old else 1


def write_index(out: str | os.PathLike, emb: np.ndarray | None, entries: list[dict], meta: dict[str, Any],
                old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a new generation of ``out`` (embeddings, entries, optional FAISS index), switch ``index.json``
    to it, then remove the previous generation and thumbnails nothing refers to any more.

    ``meta`` needs ``model`` and ``settings`` (see :func:`vop.retrieval.build.build_index`) and should have
    ``scoring`` (a model's ``scoring.record(frames, dim)``: kind, row shape, ann); without it, (N, D) rows
    are recorded as a dual encoder's and (N, F, D) rows as cma's query score's, as vop did before.
    ``faiss`` = None or ``{"kind": "ivf"|"ivfpq"|"hnsw", "params": {...}}`` (only for a scoring where FAISS
    applies). Also used by the benchmarks to write synthetic indexes.

    An index whose rows live in a Milvus collection (``meta["store"]``: its record, written there first by
    :mod:`vop.retrieval.milvus`): ``emb`` is None and only the video list and index.json are written
    (format ``vop-index/2``); ``meta`` must have ``scoring``.
    """
    from vop._version import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = old if old is not None else read_meta(out)
    gen = next_generation(old)
    created = old.get("created") if old and isinstance(old.get("created"), str) else None
    remote = isinstance(meta.get("store"), dict) and meta["store"].get("kind") == "milvus"
    if remote:
        if emb is not None or meta.get("faiss") or meta.get("scoring") is None:
            raise ValueError("an index in a Milvus store: no embeddings nor FAISS index in the folder, and a scoring record")
        stored = StoredScoring.of(meta)
        files = {"videos": f"videos-{gen}.jsonl"}
        dim, faiss_meta = stored.row_shape[-1], None
    else:
        meta = {k: v for k, v in meta.items() if k != "store"}
        if not (isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.flags.c_contiguous):
            emb = np.ascontiguousarray(emb, dtype=np.float32)  # (a memory map of float32 rows stays one)
        if emb.ndim < 2 or emb.shape[0] != len(entries):
            raise ValueError(f"{emb.shape[0] if emb.ndim else 0} embeddings for {len(entries)} entries")
        if meta.get("scoring") is not None:
            stored = StoredScoring.of(meta)
        else:  # the older API: the kind follows from the rows (and a legacy ``pairwise`` must agree with them)
            per_frame = emb.ndim == 3
            if meta.get("pairwise", per_frame) != per_frame:
                raise ValueError(f"embeddings of shape {emb.shape} for an index with pairwise={meta.get('pairwise')}")
            stored = StoredScoring.of({"pairwise": per_frame, "frames_per_video": emb.shape[1], "dim": emb.shape[-1]})
        if tuple(emb.shape[1:]) != stored.row_shape or (stored.ann and emb.ndim != 2):
            raise ValueError(f"embeddings of shape {emb.shape} for {stored.label} (rows {stored.row_shape}, ann {stored.ann})")
        if not stored.ann and meta.get("faiss"):
            raise ConfigError(f"no FAISS index over the rows of {stored.label}: its search is exact")
        from vop.retrieval.ann import iter_rows

        step = max(1, _READ_CHUNK // max(1, emb[0].nbytes)) if len(emb) else 1
        finite = (np.concatenate([np.isfinite(part.reshape(len(part), -1)).all(1) for _, part in iter_rows(emb, step)])
                  if len(emb) else np.ones(0, bool))
        if not finite.all():  # NaN/inf never enters an index (build_index lists such videos as failed before this)
            bad = [entries[i].get("id") for i in np.flatnonzero(~finite)[:5]]
            raise DataError(f"{out}: {int((~finite).sum())} embeddings hold NaN or inf values (videos {', '.join(map(repr, bad))}); "
                            "an index never stores them")
        files = {"embeddings": f"embeddings-{gen}.npy", "videos": f"videos-{gen}.jsonl"}
        _atomic_save_npy(out / files["embeddings"], emb)
        dim = int(emb.shape[-1])
    _atomic_write_lines(out / files["videos"], (json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    if not remote:
        faiss_meta = meta.get("faiss")
        if faiss_meta:
            from vop.retrieval.ann import build_faiss, save_faiss

            index, params = build_faiss(emb, faiss_meta["kind"], faiss_meta.get("params"))
            files["faiss"] = f"faiss-{gen}.index"
            save_faiss(index, out / files["faiss"])
            del index
            if faiss_meta["kind"] == "ivfpq" and params.get("rerank_dtype") == "float16":
                files["rerank"] = f"rerank-{gen}.npy"
                _atomic_save_npy(out / files["rerank"], emb, np.float16)
            faiss_meta = {"kind": faiss_meta["kind"], "params": params, "file": files["faiss"]}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    checksums = {name: file_record(out / name) for name in files.values()}  # verified by VideoIndex.open
    full = {"format": FORMAT_REMOTE if remote else FORMAT, "generation": gen, "vop_version": __version__,
            "created": created or now, "updated": now, "dim": int(dim), "count": len(entries), **meta, "faiss": faiss_meta,
            "files": files, "checksums": checksums}
    full.pop("frames_per_video", None)
    full.update(stored.fields())
    atomic_write(out / "index.json", json.dumps(full, indent=2, ensure_ascii=False).encode("utf-8"))
    # the old generation and unreferenced thumbnails go only after index.json points at the new one
    keep = set(files.values())
    for p in out.glob("*"):
        if p.is_file() and p.name != "index.json" and p.name.split("-")[0] in ("embeddings", "videos", "faiss", "rerank") and p.name not in keep:
            p.unlink()
    thumbs = out / "thumbs"
    if thumbs.is_dir():
        used = {e.get("thumb") for e in entries}
        for p in thumbs.iterdir():
            if p.name not in used and not p.name.startswith("."):
                p.unlink()
    return full
