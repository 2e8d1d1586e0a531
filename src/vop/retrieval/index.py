"""A video index: one L2-normalised embedding per video (or, for a pairwise model, its per-frame
embeddings), its metadata and a thumbnail strip.

Layout of an index folder::

    INDEX/index.json            format, model (checkpoint path + SHA-256 + metadata, backbone, ``files``:
                                size + SHA-256 of the checkpoint and backbone files), settings, counts,
                                failed/missing videos, FAISS settings, current file names, ``checksums``
                                (size + SHA-256 of each file below), ``pairwise`` (and ``frames_per_video``)
    INDEX/embeddings-<g>.npy    float32 (N, D), row i = line i of videos-<g>.jsonl; for a pairwise model
                                (``pairwise: true``) float32 (N, F, D), the raw per-frame embeddings
    INDEX/videos-<g>.jsonl      id, path, size, mtime_ns[, sha256], duration, num_frames, fps, width,
                                height, frame_indices, thumb[, captions]
    INDEX/thumbs/*.jpg          frame strips (PNG where FFmpeg has no JPEG encoder)
    INDEX/faiss-<g>.index       optional approximate index (see vop.retrieval.ann)
    INDEX/parts/                encoded batches of a run in progress (picked up by the next run)

``<g>`` is a generation number: a run writes new files, then replaces ``index.json`` atomically, then
removes the old generation, so a reader never sees embeddings and metadata of different runs and a
run killed at any point leaves a usable index. A new index is built in ``.INDEX.vop-building`` next
to ``INDEX`` (:func:`building_path`) and renamed when complete: ``INDEX`` never appears half-built.
Encoded batches are flushed to ``parts/`` as they are done, so re-running after a crash or Ctrl-C
encodes only what is left; re-running on a changed
folder encodes new and changed videos (size + mtime, or SHA-256 with ``content_hash``) and drops
the removed ones.

Frames are sampled and resized exactly as the evaluation engine does (test sampling: the middle
frame of each of F segments; short side resized to the model's input size, centre crop), so an
index of a dataset split ranks videos exactly as ``vop eval`` does.

Several processes can share the encoding (``torchrun --nproc_per_node N -m vop.cli.main index ...``):
each rank encodes every N-th remaining video and writes its own parts; rank 0 merges.

Pairwise models (``model.pairwise``: Cross-Modal Adapter's query score, where a video's pooled embedding
depends on the text) cannot be searched with one vector per video: the index keeps the per-frame
embeddings (F times the storage), every query is scored exactly against every video with the model's
similarity (:func:`pairwise_search`, in bounded blocks, as the evaluation scores them), and no FAISS index
is built for them (an approximate index cannot express the per-text pooling: asking for one is an error).

Integrity (docs/search.md, "Integrity"): :meth:`VideoIndex.open` checks ``index.json`` field by field,
the ``.npy`` header (dtype, shape, size) before reading any data, and the recorded SHA-256 of every
file while reading it (``verify=False`` skips the hashing); NaN/inf never enters an index (such a
video is listed as failed) and a non-finite score is never returned; :func:`load_index_model` checks
the checkpoint and backbone files against the sizes and SHA-256 recorded at build time before reading
them. Damage is a DataError / CheckpointError naming the file and the command that rebuilds the index
(:func:`rebuild_command`). Indexes written before checksums open with a warning and a NaN/inf scan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vop.errors import CheckpointError, ConfigError, DataError
from vop.retrieval.sources import Source, file_signature, list_sources, same_file

__all__ = ["FORMAT", "VideoIndex", "build_index", "BuildReport", "checkpoint_info", "load_index_model",
           "write_index", "sha256_file", "checkpoint_sha256", "building_path", "exact_search", "pairwise_search",
           "NO_ANN_FOR_PAIRWISE", "check_k", "rebuild_command", "model_files", "verify_model_files", "read_meta"]

FORMAT = "vop-index/1"
log = logging.getLogger("vop.retrieval")

#: why a pairwise index has no approximate (FAISS) index
NO_ANN_FOR_PAIRWISE = ("scores the frames of every video per query (text-conditioned pooling): there is no single "
                       "vector per video for an approximate nearest-neighbour index, so search is exact")


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


def _folder_sha256(digests: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in digests:
        h.update(name.encode() + bytes.fromhex(digest))
    return h.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a prompt checkpoint; for the authors' ModelScope folder, of its configuration and weights."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    from vop.formats.modelscope import read_folder

    folder = read_folder(path)
    return _folder_sha256([(f.name, sha256_file(f)) for f in (folder.config, folder.weights)])


def backbone_file(backbone: Any) -> Path | None:
    """The weights file a backbone (a path, or the name of a weights file shipped with vop) is read
    from; None for an architecture name (random weights, nothing on disk) or a CLIP object."""
    if not isinstance(backbone, (str, os.PathLike)):
        return None
    p = Path(backbone)
    if p.is_file():
        return p.resolve()
    if isinstance(backbone, str) and not p.exists():
        from vop.backbone.checkpoint import shipped_file as _shipped

        shipped = _shipped(backbone)
        return shipped.resolve() if shipped is not None else None
    return None


def model_files(checkpoint: str | os.PathLike, backbone: Any, whole: bool) -> list[dict[str, Any]]:
    """Size and SHA-256 of every file the model of an index is read from: the prompt checkpoint (for a
    ModelScope folder, its configuration and weights) and, unless the checkpoint holds every weight,
    the backbone weights file."""
    path = Path(checkpoint)
    if path.is_dir():
        from vop.formats.modelscope import read_folder

        folder = read_folder(path)
        out = [file_record(folder.config, "checkpoint config"), file_record(folder.weights, "checkpoint weights")]
    else:
        out = [file_record(path, "checkpoint")]
    bb = None if whole else backbone_file(backbone)
    if bb is not None:
        out.append(file_record(bb, "backbone"))
    return out


def sha256_of_checkpoint_records(files: Sequence[dict[str, Any]]) -> str:
    """:func:`checkpoint_sha256` from the records of :func:`model_files` (no second read)."""
    ck = [f for f in files if f["role"] == "checkpoint"]
    if ck:
        return ck[0]["sha256"]
    return _folder_sha256([(Path(f["path"]).name, f["sha256"]) for f in files
                           if f["role"] in ("checkpoint config", "checkpoint weights")])


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


def check_k(k: Any, name: str = "k") -> int:
    """The number of results asked for: an integer >= 1 (more than the index holds gives every video)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (the number of results), got {k!r}")
    return int(k)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr, dtype=np.float32))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# the model an index is built with


def checkpoint_info(checkpoint: str | os.PathLike, backbone: str | None = None) -> dict[str, Any]:
    """What an index records about its model: enough to rebuild it and to notice a changed file."""
    from vop.methods.checkpoint import backbone_record, checkpoint_facts, read_checkpoint_meta

    path = Path(checkpoint)
    meta = read_checkpoint_meta(path, backbone if path.is_dir() else None)
    whole = checkpoint_facts(path, meta).whole_model  # its file holds every weight: no backbone to record
    bb = backbone or meta.get("backbone")
    if bb is None and not whole:
        raise ConfigError(f"{path}: records no backbone; pass --backbone (the CLIP weights the prompts were trained on)")
    files = model_files(path, bb, whole)
    return {
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": sha256_of_checkpoint_records(files),
        "method": meta["method"],
        "options": meta["options"],
        "frames": meta["frames"],
        "arch_name": meta.get("arch_name"),
        "backbone": backbone_record(bb) if not whole else None,
        "backbone_fingerprint": meta.get("backbone_fingerprint"),
        "files": files,  # size + SHA-256 of the checkpoint file(s) and the backbone weights file
        "checkpoint_meta": meta,
    }


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


def _digest(path: Path, memo: dict | None) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo is not None and key in memo:
        return memo[key]
    d = sha256_file(path)
    if memo is not None:
        memo[key] = d
    return d


def verify_model_files(info: dict[str, Any], *, checkpoint: str | os.PathLike | None = None, backbone: Any = None,
                       verify: bool = True, memo: dict | None = None, where: str = "the index",
                       rebuild: str = "vop index ... --rebuild") -> bool:
    """Check the files the model of an index is read from against the sizes and SHA-256 recorded when
    it was built (:func:`model_files`): the checkpoint (``checkpoint``: its new location, if it moved)
    and the backbone weights file (``backbone``: the one given instead of the recorded one). A
    CheckpointError names a missing or changed file. ``memo``: digests already computed in this
    process, by (path, size, mtime). ``verify=False``: the backbone file is hashed
    only if its size or modification time differs from the record (the checkpoint is always hashed:
    its SHA-256 identifies it). False when the index records no files (built by an older vop): the
    caller then checks the checkpoint's SHA-256 alone."""
    files = info.get("files")
    if not files:
        return False
    ckpt = Path(checkpoint or info["checkpoint"])
    bb_given = backbone if backbone is not None else info.get("backbone")
    for rec in files:
        role = rec["role"]
        if role == "checkpoint":
            actual: Path | None = ckpt
        elif role.startswith("checkpoint "):
            actual = ckpt / Path(rec["path"]).name
        elif role == "backbone":
            actual = backbone_file(bb_given)
            if actual is None:
                from vop.backbone.config import is_arch

                if not isinstance(bb_given, (str, os.PathLike)) or (isinstance(bb_given, str) and is_arch(bb_given)):
                    continue  # a CLIP object or an architecture: the weights fingerprint is compared when loading
                actual = Path(bb_given)  # a path that is not there
        else:
            continue
        what = f"the {role} file {where} was built with"
        if not actual.is_file():
            flag = "--backbone" if role == "backbone" else "--checkpoint"
            raise CheckpointError(f"{actual}: missing: {what} (recorded as {rec['path']}); restore it, or pass {flag} "
                                  f"with its new location")
        st = actual.stat()
        shortcut = not verify and role == "backbone" and st.st_mtime_ns == rec.get("mtime_ns")
        if st.st_size != rec["size"]:
            changed = f"{st.st_size:,} bytes, {rec['size']:,} when the index was built"
        elif not shortcut and _digest(actual, memo) != rec["sha256"]:
            changed = f"SHA-256 differs from {rec['sha256'][:12]}... recorded when the index was built"
        else:
            continue
        if role.startswith("checkpoint"):
            raise CheckpointError(f"{actual}: differs from the checkpoint this index was built with ({changed}): its video "
                                  f"embeddings would not match; restore {what}, or rebuild the index with this "
                                  f"checkpoint: {rebuild}")
        raise CheckpointError(f"{actual}: changed since {where} was built ({changed}): the video embeddings were made with "
                              f"other backbone weights; restore the file, or rebuild the index with it: {rebuild}")
    return True


def load_index_model(info: dict[str, Any], *, backbone: Any = None, checkpoint: str | os.PathLike | None = None,
                     device: torch.device | str = "cpu", check_sha: bool = True, verify: bool = True,
                     memo: dict | None = None, where: str = "the index", rebuild: str = "vop index ... --rebuild"):
    """Rebuild the model of ``checkpoint_info`` (optionally with another path for a moved checkpoint
    or backbone). The checkpoint must be the very file that was indexed (same SHA-256), and so must
    the backbone weights file where the index records it (:func:`verify_model_files`), both checked
    before either is read."""
    from vop.methods.checkpoint import load_checkpoint

    ckpt = Path(checkpoint or info["checkpoint"])
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: the index's prompt checkpoint is missing; pass --checkpoint with its new location")
    if check_sha and not verify_model_files(info, checkpoint=ckpt, backbone=backbone, verify=verify, memo=memo,
                                            where=where, rebuild=rebuild):
        if checkpoint_sha256(ckpt) != info["checkpoint_sha256"]:
            raise CheckpointError(
                f"{ckpt}: differs from the checkpoint this index was built with (SHA-256 {info['checkpoint_sha256'][:12]}...): "
                f"its video embeddings would not match; re-run `vop index` with this checkpoint (into a new --out or with --rebuild)")
    bb = backbone if backbone is not None else info.get("backbone")
    model = load_checkpoint(ckpt, bb)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# reading an index


@dataclass
class VideoIndex:
    """A loaded index: ``emb`` (N, D) float32 (a pairwise index: (N, F, D), the raw per-frame embeddings),
    ``entries`` (N dicts), ``meta`` (index.json)."""

    path: Path
    meta: dict[str, Any]
    emb: np.ndarray
    entries: list[dict[str, Any]]
    _faiss: Any = field(default=None, repr=False)
    _emb_t: torch.Tensor | None = field(default=None, repr=False)
    _cache: torch.Tensor | None = field(default=None, repr=False)
    verified: bool = True  # the files' checksums (or, for an older index, finite values) were checked at open

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> "VideoIndex":
        """Read an index. ``index.json`` is checked field by field; the embeddings' header (dtype,
        shape: the count and dimension index.json records) and size are checked before any data is
        read; with ``verify`` (default) every file is checked against the SHA-256 recorded when it was
        written (an index of an older vop, without checksums: its embeddings are checked for NaN/inf
        instead, with a warning). Any damage is a DataError naming the file and the command that
        rebuilds the index. ``verify=False`` skips the hashing (about 1.2 s per 2 GB of embeddings);
        a non-finite score is still refused when searching."""
        path = Path(path)
        meta = read_meta(path)
        if meta is None:
            raise DataError(f"{path}: not a vop index (no index.json); build one with `vop index --videos DIR --checkpoint CKPT --out {path}`")
        files, sums = meta["files"], meta.get("checksums")
        hint = rebuild_command(path, meta)
        if verify and sums is None:
            log.warning("%s: built by an older vop: its files carry no checksums, so damage to them cannot be detected "
                        "(only NaN/inf is checked); running its `vop index` command again adds them", path)
        check = sums if verify else None
        shape = ((meta["count"], meta["frames_per_video"], meta["dim"]) if meta.get("pairwise")
                 else (meta["count"], meta["dim"]))
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
        return cls(path, meta, emb, entries, verified=verify)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def pairwise(self) -> bool:
        """Whether the index holds per-frame embeddings of a pairwise model (scored with its similarity)."""
        return bool(self.meta.get("pairwise", False))

    def check_model(self, model: Any, checkpoint: str | os.PathLike | None = None) -> None:
        """Refuse a model whose kind of scores (pairwise or dual encoder) does not match the index's."""
        mp = bool(getattr(model, "pairwise", False))
        if mp != self.pairwise:
            raise ConfigError(kind_mismatch(self.path, self.pairwise, checkpoint, mp, getattr(model, "name", type(model).__name__),
                                            self.meta))

    @property
    def model_info(self) -> dict[str, Any]:
        return self.meta["model"]

    @property
    def faiss_kind(self) -> str | None:
        f = self.meta.get("faiss")
        return f["kind"] if f else None

    def faiss_index(self, **search_params: Any):
        """The FAISS index (loaded once), with optional search parameters (nprobe, ef_search)."""
        from vop.retrieval.ann import load_faiss, set_search_params

        f = self.meta.get("faiss")
        if not f:
            raise ConfigError(f"{self.path}: has no FAISS index; build it with `vop index ... --faiss ivf|hnsw`")
        if self._faiss is None:
            file = self.path / self.meta["files"]["faiss"]
            try:
                self._faiss = load_faiss(file, f["kind"], f["params"])
            except ConfigError:
                raise
            except Exception as e:  # faiss raises RuntimeError for a file it cannot parse
                raise DataError(f"{file}: not a readable FAISS index ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                                f"the index is damaged: rebuild it: {rebuild_command(self.path, self.meta)}") from None
        if any(v is not None for v in search_params.values()):
            set_search_params(self._faiss, f["kind"], {**f["params"], **{k: v for k, v in search_params.items() if v is not None}})
        return self._faiss

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 5, *, exact: bool | None = None,
               nprobe: int | None = None, ef_search: int | None = None, model: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each L2-normalised query (Q, D): ``(scores (Q, k'), rows (Q, k'))``, best first,
        ``k' = min(k, N)``. Exact (one matrix product) unless the index has FAISS and ``exact`` is not True.
        Ties are ordered by row.

        A pairwise index needs its ``model`` (the queries are then its raw text embeddings): every video is
        scored exactly with the model's similarity (:func:`pairwise_search`); ``exact``, ``nprobe`` and
        ``ef_search`` do not apply (there is no approximate index)."""
        k = check_k(k)
        if model is not None:
            self.check_model(model)  # a model given with an index of the other kind is refused, never ignored
        if self.pairwise:
            if model is None:
                raise ConfigError(f"{self.path}: a pairwise index ({self.model_info.get('method')}) is scored by its "
                                  "model's similarity: search it with vop.retrieval.Searcher (or pass model=)")
        q = (queries.detach().cpu().float() if torch.is_tensor(queries)
             else torch.as_tensor(np.asarray(queries, dtype=np.float32)))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"queries have shape {tuple(q.shape)}, the index {self.path} takes (Q, {self.dim})")
        if not bool(torch.isfinite(q).all()):
            raise ConfigError(f"queries hold NaN or inf values; {self.path} cannot rank videos against them")
        if self.pairwise:
            scores, rows = pairwise_search(model, self.emb_tensor, q, k, cache=self.gallery_cache(model))
        elif self.faiss_kind is not None and exact is not True and k < len(self):
            from vop.retrieval.ann import faiss_search

            # (k >= the index size: every video is returned, ranked exactly, as by the other kinds)
            scores, rows = faiss_search(self.faiss_index(nprobe=nprobe, ef_search=ef_search), q.numpy(), k)
            rows = rows.astype(np.int64)
        else:
            scores, rows = exact_search(self.emb_tensor, q, k)
        self._check_scores(scores, rows)
        return scores, rows

    def _check_scores(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """A NaN or inf score never leaves the index: it means damaged embeddings (or model weights)."""
        bad = ~np.isfinite(scores) & (rows >= 0)
        if bad.any():
            q, j = map(int, np.argwhere(bad)[0])
            r = int(rows[q, j])
            vid = self.entries[r]["id"] if 0 <= r < len(self.entries) else "?"
            where = self.path / self.meta["files"]["embeddings"]
            why = ("its embeddings were not verified (verify=False / --no-verify): the file is probably damaged"
                   if not self.verified else "the model's weights or the file may be damaged")
            raise DataError(f"{where}: video {vid!r} (row {r}) scored {float(scores[q, j])} (not a number): {why}; "
                            f"rebuild the index: {rebuild_command(self.path, self.meta)}")

    @property
    def emb_tensor(self) -> torch.Tensor:
        if self._emb_t is None:
            self._emb_t = torch.from_numpy(self.emb)
        return self._emb_t

    def gallery_cache(self, model: Any) -> torch.Tensor | None:
        """The model's :meth:`~vop.methods.base.VideoTextModel.gallery_cache` of every stored video (cma: the
        F x F frame Gram matrices, N x F^2 float32: 0.58 GB at 1M videos, F = 12), computed once on first use
        and kept, so that a query costs N x F x D multiply-adds instead of N x F x (F + 1) x D. None when
        the model keeps no per-video work."""
        if self._cache is None:
            v = self.emb_tensor
            step, parts = 1 << 16, []
            with torch.no_grad():
                for s in range(0, v.shape[0], step):
                    part = model.gallery_cache(v[s:s + step])
                    if part is None:
                        return None
                    parts.append(part)
            self._cache = torch.cat(parts) if parts else None
        return self._cache


def _topk_merge(best_s: torch.Tensor, best_i: torch.Tensor, scores: torch.Tensor, start: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kk = min(k, scores.shape[1])
    v, i = scores.topk(kk, dim=1)
    best_s = torch.cat([best_s, v], 1)
    best_i = torch.cat([best_i, i + start], 1)
    if best_s.shape[1] > k:
        v, j = best_s.topk(k, dim=1)
        best_s, best_i = v, best_i.gather(1, j)
    return best_s, best_i


def _ordered(best_s: torch.Tensor, best_i: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic order: score descending, then row ascending."""
    order = np.lexsort((best_i.numpy(), -best_s.numpy().astype(np.float64)), axis=1)
    return np.take_along_axis(best_s.numpy(), order, 1), np.take_along_axis(best_i.numpy(), order, 1)


@torch.no_grad()
def exact_search(emb: torch.Tensor, q: torch.Tensor, k: int, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of ``q`` (Q, D) against ``emb`` (N, D), streamed over ``chunk`` rows
    (so 1M x Q scores never sit in memory at once). Best first; equal scores ordered by row."""
    n = emb.shape[0]
    k = min(k, n)
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for s in range(0, n, chunk):
        scores = q @ emb[s:s + chunk].T  # (Q, c): the same product as vop.engine.metrics.similarity_chunked
        best_s, best_i = _topk_merge(best_s, best_i, scores, s, k)
    return _ordered(best_s, best_i)


@torch.no_grad()
def pairwise_search(model: Any, frames: torch.Tensor, q: torch.Tensor, k: int, *, cache: torch.Tensor | None = None,
                    max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of a pairwise model: ``model.similarity(q (Q, D) raw text, frames (N, F, D))`` for every
    video, streamed over blocks of videos (and of at most 256 queries) so that no queries x videos x frames
    tensor over ``max_bytes`` (default :data:`vop.runtime.PAIRWISE_CHUNK_BYTES`, float32) exists and only
    the running top-k is kept. Scores are the model's unscaled similarity (cosines for cma), computed on
    the CPU like :func:`exact_search`. ``cache``: the model's gallery cache of ``frames`` (kept by
    :meth:`VideoIndex.gallery_cache`; cma's Gram matrices: the same scores, F times less work per query).
    Best first; ties by row."""
    from vop.runtime import pairwise_chunks

    n, fr = frames.shape[0], frames.shape[1]
    nq = q.shape[0]
    k = min(k, n)
    scores_out = np.zeros((nq, k), np.float32)
    rows_out = np.zeros((nq, k), np.int64)
    if k == 0 or nq == 0:
        return scores_out, rows_out
    tc, vc = pairwise_chunks(nq, fr, n, max_bytes)
    q = q.float()
    for t0 in range(0, nq, tc):
        qt = q[t0:t0 + tc]
        best_s = torch.full((qt.shape[0], 0), float("-inf"))
        best_i = torch.zeros((qt.shape[0], 0), dtype=torch.long)
        for s in range(0, n, vc):
            f = frames[s:s + vc]
            scores = model.similarity(qt, f, cache=None if cache is None else cache[s:s + vc])
            best_s, best_i = _topk_merge(best_s, best_i, scores.float(), s, k)
        sc, rw = _ordered(best_s, best_i)
        scores_out[t0:t0 + tc], rows_out[t0:t0 + tc] = sc, rw
    return scores_out, rows_out


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
    if meta.get("format") != FORMAT:
        raise DataError(f"{f}: unknown index format {meta.get('format')!r} (expected {FORMAT})")

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
        ("model", lambda v: isinstance(v, dict), "an object"),
        ("settings", lambda v: isinstance(v, dict), "an object"),
        ("files", lambda v: isinstance(v, dict), "an object"),
        ("faiss", lambda v: v is None or isinstance(v, dict), "null or an object"),
        ("failed", lambda v: v is None or (isinstance(v, list) and all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in v)),
         "a list of {id, ...}"),
        ("missing", lambda v: v is None or isinstance(v, list), "a list"),
        ("checksums", lambda v: v is None or (isinstance(v, dict) and all(
            name(k) and isinstance(c, dict) and _is_int(c.get("size")) and isinstance(c.get("sha256"), str)
            and bool(_HEX64.fullmatch(c["sha256"])) for k, c in v.items())), "an object {file: {size, sha256}}"),
    ):
        if not ok(meta.get(key)):
            raise bad(key, want)
    if meta.get("pairwise") and not _is_int(meta.get("frames_per_video"), 1):
        raise bad("frames_per_video", "an integer >= 1 (a pairwise index)")
    files = meta["files"]
    for key in ("embeddings", "videos") + (("faiss",) if meta.get("faiss") else ()):
        if not name(files.get(key)):
            raise bad(f"files.{key}", "a file name in the index folder")
    fa = meta.get("faiss")
    if fa:
        from vop.retrieval.ann import KINDS

        if fa.get("kind") not in KINDS:
            raise bad("faiss.kind", " or ".join(KINDS))
        if not isinstance(fa.get("params"), dict):
            raise bad("faiss.params", "an object")
        if meta.get("pairwise"):
            raise bad("faiss", f"null (a pairwise index has no FAISS index: the model {NO_ANN_FOR_PAIRWISE})")
    mw = meta["settings"].get("max_words")
    if mw is not None and not _is_int(mw, 1):
        raise bad("settings.max_words", "an integer >= 1")
    sums = meta.get("checksums")
    if sums is not None:
        for key in ("embeddings", "videos") + (("faiss",) if fa else ()):
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


def kind_mismatch(index: Path, index_pairwise: bool, checkpoint: Any, model_pairwise: bool, method: str,
                  meta: dict | None = None) -> str:
    """The message refusing a model (of ``checkpoint``, if known) whose kind of scores differs from the index's."""
    kind = lambda p: ("a pairwise index (per-frame embeddings, scored by the model's text-conditioned similarity)"  # noqa: E731
                      if p else "a dual-encoder index (one vector per video)")
    mkind = "a pairwise model (per-frame, text-conditioned scores)" if model_pairwise else "a dual-encoder model (one vector per video)"
    model = meta.get("model") if isinstance(meta, dict) else None
    built = model.get("checkpoint") if isinstance(model, dict) else None
    what = f"the checkpoint {checkpoint} ({method})" if checkpoint is not None else f"the model ({method})"
    return (f"{index}: {kind(index_pairwise)}, but {what} is {mkind}: they cannot be mixed, its scores cannot be computed "
            f"from these embeddings; search it with the checkpoint it was built with{f' ({built})' if built else ''}, or "
            f"rebuild the index with this one: {rebuild_command(index, meta, checkpoint if checkpoint is not None else 'CHECKPOINT')}")


# --------------------------------------------------------------------------------------------------
# encoding


@dataclass
class _Settings:
    frames: int
    image_size: int
    thumb_frames: int
    thumb_height: int
    content_hash: bool


class _IndexItems(Dataset):
    """One item per video: model frames (test sampling, resized + cropped), info and a thumbnail strip."""

    def __init__(self, sources: Sequence[Source], s: _Settings, thumb_dir: Path):
        self.sources, self.s, self.thumb_dir = list(sources), s, thumb_dir

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        from vop.data.decode import VideoReader, sample_indices
        from vop.data.transforms import resize_center_crop
        from vop.retrieval.images import encode_image, pick_thumb_frames, thumbnail_strip

        src, s = self.sources[i], self.s
        out: dict[str, Any] = {"id": src.id, "path": str(src.path.resolve()), "i": i}
        try:
            out["signature"] = file_signature(src.path, s.content_hash)
            with VideoReader(src.path) as r:
                idx = sample_indices(r.num_frames, s.frames)
                frames = r.get(idx)  # (F, H, W, 3) uint8 as displayed, exactly as vop.data's test sampling
                info = r.info  # after get(): the display orientation is known without another decode
        except DataError as e:
            out["error"] = str(e)
            return out
        except Exception as e:  # one bad file never stops a long indexing run; it is listed as failed
            out["error"] = f"{src.path}: {type(e).__name__}: {e}"
            return out
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        out["video"] = resize_center_crop(x, s.image_size).contiguous()
        strip = thumbnail_strip(frames[pick_thumb_frames(len(frames), s.thumb_frames)], s.thumb_height)
        data, ext = encode_image(strip)
        key = hashlib.sha1(json.dumps([src.id, out["signature"]], sort_keys=True).encode()).hexdigest()[:20]
        name = f"{key}{ext}"
        _atomic_write(self.thumb_dir / name, data)
        out.update(thumb=name, duration=info.duration, num_frames=info.num_frames, fps=info.fps, width=info.width,
                   height=info.height, codec=info.codec, frame_indices=[int(v) for v in idx])
        return out


def nonfinite_error(path: str) -> str:
    """The ``failed`` reason of a video whose embedding held NaN or inf."""
    return (f"{path}: the model gave a non-finite embedding (NaN or inf) for this video, so it is not indexed "
            "(fp16 overflow on a GPU is the usual cause: try --device cpu; --retry-failed tries it again)")


def _collate(items: list[dict]) -> list[dict]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class BuildReport:
    path: Path
    total: int = 0           # videos in the index after this run
    encoded: int = 0         # encoded by this run (all ranks)
    reused: int = 0          # already in the index and unchanged
    removed: int = 0         # in the index but no longer in the source
    failed: dict[str, str] = field(default_factory=dict)    # unreadable videos {id: error}
    missing: dict[str, str] = field(default_factory=dict)   # listed by the annotations but absent
    skipped: dict[str, str] = field(default_factory=dict)   # left out of the folder walk {path: reason}
    seconds: float = 0.0
    rank: int = 0
    merged: bool = True      # False on ranks other than 0 (they only encode)
    faiss: dict | None = None
    pairwise: bool = False   # per-frame embeddings of a pairwise model: exact search only, no FAISS

    @property
    def videos_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _dist_env():
    from vop.engine.distributed import DistEnv

    return DistEnv.from_env()


def _entry(item: dict, src: Source) -> dict[str, Any]:
    e = {"id": item["id"], "path": item["path"], **item["signature"]}
    for k in ("duration", "num_frames", "fps", "width", "height", "codec", "frame_indices", "thumb"):
        e[k] = item[k]
    if src.captions:
        e["captions"] = src.captions
    return e


def _write_part(parts: Path, rank: int, emb: list[np.ndarray], entries: list[dict], failed: list[dict]) -> None:
    name = f"r{rank}-{time.time_ns()}-{uuid.uuid4().hex[:6]}.npz"
    tmp = parts / f".{name}.tmp"
    arr = np.concatenate(emb) if emb else np.zeros((0, 0), np.float32)
    with open(tmp, "wb") as f:
        np.savez(f, emb=arr, entries=np.frombuffer(json.dumps(entries).encode(), np.uint8),
                 failed=np.frombuffer(json.dumps(failed).encode(), np.uint8))
    os.replace(tmp, parts / name)


def _read_parts(parts: Path) -> list[tuple[np.ndarray, list[dict], list[dict]]]:
    out = []
    for p in sorted(parts.glob("r*.npz"), key=lambda p: (int(p.name.split("-")[1]), p.name)):
        try:
            with np.load(p) as z:
                out.append((z["emb"].astype(np.float32), json.loads(z["entries"].tobytes()), json.loads(z["failed"].tobytes())))
        except Exception as e:  # a part is written atomically; anything else in there is not ours
            log.warning("ignoring unreadable part %s (%s)", p, e)
    return out


def _check_compatible(path: Path, old: dict, new: dict) -> None:
    om = old["model"]
    nm = new["model"]
    diffs = []
    if om.get("checkpoint_sha256") != nm["checkpoint_sha256"]:
        diffs.append(f"checkpoint {om.get('checkpoint')} (SHA-256 {str(om.get('checkpoint_sha256'))[:12]}) vs {nm['checkpoint']} "
                     f"({nm['checkpoint_sha256'][:12]})")
    if om.get("backbone_fingerprint") != nm.get("backbone_fingerprint"):
        diffs.append(f"backbone weights {om.get('backbone_fingerprint')} vs {nm.get('backbone_fingerprint')}")
    bb = lambda m: next((f.get("sha256") for f in m.get("files") or () if isinstance(f, dict) and f.get("role") == "backbone"), None)  # noqa: E731
    if bb(om) is not None and bb(nm) is not None and bb(om) != bb(nm):
        diffs.append(f"backbone weights file (SHA-256 {bb(om)[:12]} vs {bb(nm)[:12]})")
    for k in ("frames", "image_size"):
        if old["settings"].get(k) != new["settings"][k]:
            diffs.append(f"{k} {old['settings'].get(k)} vs {new['settings'][k]}")
    if bool(old.get("pairwise", False)) != bool(new.get("pairwise", False)):
        kind = lambda p: "per-frame (pairwise)" if p else "one vector per video"  # noqa: E731
        diffs.append(f"embeddings {kind(old.get('pairwise', False))} vs {kind(new.get('pairwise', False))}")
    if diffs:
        raise ConfigError(f"{path}: was built with different settings ({'; '.join(diffs)}); its embeddings cannot be "
                          "mixed with new ones: pass --rebuild to re-encode every video, or choose another --out")


#: Test hook, not a setting: with ``VOP_TEST_STOP_AFTER_PARTS=N`` in the environment, :func:`build_index`
#: ends the process abruptly (``os._exit(3)``: no merge, no cleanup) once it has flushed N parts, as a
#: kill would. tests/test_retrieval_index.py sets it in a subprocess to test resuming a killed run.
TEST_STOP_ENV = "VOP_TEST_STOP_AFTER_PARTS"


def _test_stop_after_parts() -> int | None:
    value = os.environ.get(TEST_STOP_ENV, "").strip()
    return int(value) if value else None


def build_index(
    videos: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str | None = None,
    batch_size: int = 16,
    split: str = "all",
    root: str | os.PathLike | None = None,
    frames: int | None = None,
    image_size: int | None = None,
    max_words: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    content_hash: bool = False,
    rebuild: bool = False,
    retry_failed: bool = False,
    faiss: str | None = None,
    faiss_params: dict[str, Any] | None = None,
    thumb_frames: int = 5,
    thumb_height: int = 96,
    flush_videos: int = 256,
    flush_seconds: float = 60.0,
    progress: bool = True,
) -> BuildReport:
    """Encode every video of ``videos`` (a folder, or a collection annotation file) with the model of
    ``checkpoint`` into the index folder ``out``; resumable and incremental (see the module docstring).

    ``faiss``: None keeps the index's current FAISS setting (none for a new index), ``"none"`` removes
    it, ``"ivf"``/``"hnsw"`` (re)build it with ``faiss_params`` (nlist, nprobe / M, ef_construction,
    ef_search). A pairwise model (``model.pairwise``) gets per-frame embeddings and no FAISS index:
    ``"ivf"``/``"hnsw"`` is then a ConfigError (before any video is decoded), a kept setting is dropped. Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 merges and returns the
    full report.

    The phases, in order: load the model (:func:`_load_model`), open the target folder
    (:func:`_open_target`), plan what is left to encode (:func:`_plan`), encode this rank's share into
    parts (:func:`_encode_share`), then on rank 0 merge the index and every part (:func:`_merge`) and
    write the next generation (:func:`_write`).
    """
    import torch.distributed as dist

    t0 = time.perf_counter()
    env = _dist_env()
    own_group = False
    work_dir: Path | None = None  # set while a new index is being built next to ``out``
    if env.enabled and not dist.is_initialized():
        dist.init_process_group("gloo")  # CPU collectives (barriers) also when ranks encode on GPUs
        own_group = True
    try:
        _check_args(batch_size, thumb_frames, thumb_height, faiss)
        model, dev, info = _load_model(checkpoint, backbone, device, env)
        pairwise = bool(getattr(model, "pairwise", False))
        if pairwise and faiss in ("ivf", "hnsw"):
            raise ConfigError(f"--faiss {faiss}: {checkpoint} is a {info['method']} model that {NO_ANN_FOR_PAIRWISE}; "
                              "leave out --faiss (or pass --faiss none)")
        if faiss in ("ivf", "hnsw"):
            from vop.retrieval.ann import require_faiss

            require_faiss()  # fail before encoding anything
        # before any folder is made or video decoded: can this model take that many frames?
        frames = model.check_frames(frames, str(checkpoint))
        if image_size is not None and image_size < 1:
            raise ConfigError(f"--image-size must be >= 1, got {image_size}")
        settings = _Settings(frames, image_size or model.clip.cfg.vision.image_size, thumb_frames,
                             thumb_height, content_hash)
        new_meta = {"model": info, "settings": {"frames": settings.frames, "image_size": settings.image_size,
                                                "max_words": max_words, "thumb_frames": thumb_frames,
                                                "thumb_height": thumb_height, "content_hash": content_hash},
                    "pairwise": pairwise}
        tgt = _open_target(Path(out), new_meta, env, rebuild)
        if tgt.building:
            work_dir = tgt.out
        plan = _plan(tgt, videos, env, split=split, root=root, content_hash=content_hash, rebuild=rebuild,
                     retry_failed=retry_failed)
        report = BuildReport(tgt.target, rank=env.rank, missing=plan.missing, skipped=plan.skipped, pairwise=pairwise)
        encoded = _encode_share(plan, model, dev, settings, env, batch_size=batch_size, num_workers=num_workers,
                                flush_videos=flush_videos, flush_seconds=flush_seconds, progress=progress)
        report.encoded = encoded
        counts = [encoded]
        if env.enabled:
            dist.barrier()  # every rank's parts are on disk
            counts = [None] * env.world_size
            dist.all_gather_object(counts, encoded)
            report.encoded = sum(counts)
        if not env.is_main:
            report.merged = False
            report.seconds = time.perf_counter() - t0
            if env.enabled:
                dist.barrier()
            return report

        pairwise = bool(getattr(model, "pairwise", False))
        row_shape = (settings.frames, model.clip.cfg.embed_dim) if pairwise else (model.clip.cfg.embed_dim,)
        merged = _merge(plan, retry_failed, row_shape)
        report.total = len(merged.entries)
        report.reused = len(plan.done_ids & merged.ids)
        report.removed = sum(1 for e in plan.base_entries if e["id"] not in plan.by_id)
        report.failed = {i: e["error"] for i, e in merged.failed.items()}
        run = {"world_size": env.world_size, "encoded_per_rank": counts, "device": str(dev), "batch_size": batch_size}
        report.faiss = _write(tgt, plan, merged, new_meta, run, videos=videos, split=split, rebuild=rebuild,
                              removed=report.removed, faiss=faiss, faiss_params=faiss_params)
        report.seconds = time.perf_counter() - t0
        if env.enabled:
            dist.barrier()
        return report
    except BaseException:
        if env.is_main and work_dir is not None and work_dir.is_dir():
            if (work_dir / "index.json").is_file() or any((work_dir / "parts").glob("r*.npz")):
                log.warning("the videos encoded so far are kept in %s: run the same command again to go on", work_dir)
            else:  # nothing worth resuming: no trace of the failed run
                shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        if own_group:
            dist.destroy_process_group()


def _check_args(batch_size: int, thumb_frames: int, thumb_height: int, faiss: str | None) -> None:
    if batch_size < 1 or thumb_frames < 1 or thumb_height < 2:
        raise ConfigError("batch size, thumbnail frames and height must be positive")
    if faiss not in (None, "none", "ivf", "hnsw"):
        raise ConfigError(f"--faiss must be none, ivf or hnsw, got {faiss!r}")


def _load_model(checkpoint: str | os.PathLike, backbone: str | None, device: str, env) -> tuple[Any, torch.device, dict[str, Any]]:
    """Phase 1: the model on this rank's device, and what the index records about it."""
    from vop.runtime import resolve_device

    info = checkpoint_info(checkpoint, backbone)
    dev = resolve_device(device, local_rank=env.local_rank if env.enabled else None)
    model = load_index_model(info, device=dev, check_sha=False)
    info["backbone_fingerprint"] = model.backbone_fingerprint
    return model, dev, info


@dataclass
class _Target:
    """Where a run writes: ``target`` is the index folder asked for; ``out`` is where its files are
    now (``target``, or for a new index the building folder next to it: ``building``)."""

    target: Path
    out: Path
    work: Path
    old: dict[str, Any] | None  # the index's index.json; None for a new index
    building: bool


def _open_target(out: Path, new_meta: dict[str, Any], env, rebuild: bool) -> _Target:
    """Phase 2: finish a run killed before its rename, adopt what an older vop left, refuse a folder of
    other files or an index built with other settings (unless ``rebuild``)."""
    import torch.distributed as dist

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not an index folder")
    target, work = out, building_path(out)
    if env.is_main and (work / "index.json").is_file() and not _holds_files(out, allowed=()):
        _move_into_place(work, out)  # a run killed between its last write and the rename
    if env.enabled:
        dist.barrier()
    try:
        old = read_meta(out) if out.exists() else None
    except DataError as e:
        if not rebuild:
            raise
        log.warning("%s; --rebuild replaces it", e)
        old = {}  # an index whose index.json is damaged: --rebuild writes a new generation over it
    if old is None and _holds_files(out, allowed=()):
        if _holds_files(out):
            raise ConfigError(f"{out}: is a folder that holds other files; give a new or empty folder for the index")
        if env.is_main and not work.exists():  # parts/ and thumbs/ left by an older vop: go on with them
            os.replace(out, work)
    if env.enabled:
        dist.barrier()
    if old is None:  # a new index is built next to the target and renamed at the end: never half there
        return _Target(target, work, work, None, True)
    if not rebuild:  # (with --rebuild, ``old`` may be {}: a damaged index.json)
        _check_compatible(out, old, new_meta)
    return _Target(target, out, work, old, False)


@dataclass
class _Plan:
    """What a run has to do: the source's videos, what the index and the parts of interrupted runs
    already hold, and this rank's share of the rest (``mine``)."""

    sources: list[Source]
    by_id: dict[str, Source]
    missing: dict[str, str]
    skipped: dict[str, str]
    parts_dir: Path
    thumb_dir: Path
    content_hash: bool
    current: dict[str, dict]  # size + mtime of every source video now
    base_entries: list[dict] = field(default_factory=list)
    base_emb: np.ndarray | None = None
    base_failed: list[dict] = field(default_factory=list)
    done_ids: set[str] = field(default_factory=set)
    mine: list[Source] = field(default_factory=list)

    def unchanged(self, entry: dict) -> bool:
        """Whether ``entry`` (of the index or a part) is of a video still in the source, unchanged."""
        src = self.by_id.get(entry["id"])
        if src is None:
            return False
        sig = self.current[src.id]
        if self.content_hash and "sha256" in entry and (entry.get("size") != sig["size"] or entry.get("mtime_ns") != sig["mtime_ns"]):
            sig = file_signature(src.path, True)
        return same_file(entry, sig)


def _plan(tgt: _Target, videos: str | os.PathLike, env, *, split: str, root: str | os.PathLike | None,
          content_hash: bool, rebuild: bool, retry_failed: bool) -> _Plan:
    """Phase 3: list the source, read what is already done (the current generation, plus parts of
    interrupted runs) and deal the rest out to the ranks."""
    import torch.distributed as dist

    out = tgt.out
    walk_skipped: dict[str, str] = {}
    sources, missing = list_sources(videos, split=split, root=root, exclude=[tgt.target, tgt.work], skipped=walk_skipped)
    by_id = {s.id: s for s in sources}
    if len(by_id) != len(sources):
        raise DataError(f"{videos}: the same video id appears twice")

    parts_dir, thumb_dir = out / "parts", out / "thumbs"
    if env.is_main:
        parts_dir.mkdir(parents=True, exist_ok=True)
        thumb_dir.mkdir(parents=True, exist_ok=True)
        if rebuild:
            for p in parts_dir.glob("*"):
                p.unlink()
    if env.enabled:
        dist.barrier()
    plan = _Plan(sources, by_id, missing, walk_skipped, parts_dir, thumb_dir, content_hash,
                 {s.id: file_signature(s.path, False) for s in sources})
    if tgt.old is not None and not rebuild:
        idx = VideoIndex.open(out)
        plan.base_entries, plan.base_emb, plan.base_failed = idx.entries, idx.emb, tgt.old.get("failed") or []

    done_ids = plan.done_ids
    for e in plan.base_entries:
        if plan.unchanged(e):
            done_ids.add(e["id"])
    for _, entries, failed in _read_parts(parts_dir):
        for e in entries:
            if plan.unchanged(e):
                done_ids.add(e["id"])
        if not retry_failed:
            for e in failed:
                if plan.unchanged(e):
                    done_ids.add(e["id"])
    if not retry_failed:
        for e in plan.base_failed:
            if plan.unchanged(e):
                done_ids.add(e["id"])
    todo = [s for s in sources if s.id not in done_ids]
    plan.mine = todo[env.rank::env.world_size]
    return plan


def _encode_share(plan: _Plan, model, dev: torch.device, settings: _Settings, env, *, batch_size: int, num_workers: int,
                  flush_videos: int, flush_seconds: float, progress: bool) -> int:
    """Phase 4: encode this rank's share, flushing parts to ``parts/`` as it goes; the number encoded."""
    from vop.runtime import autocast_dtype, embed_video_batch

    mine = plan.mine
    if not mine:
        return 0
    stop_after = _test_stop_after_parts()
    encoded = 0
    model.eval()
    dtype = autocast_dtype(dev)
    ds = _IndexItems(mine, settings, plan.thumb_dir)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if num_workers > 0 else None)
    p_emb: list[np.ndarray] = []
    p_entries: list[dict] = []
    p_failed: list[dict] = []
    last_flush, n_parts = time.monotonic(), 0
    bar = tqdm(total=len(mine), desc="index", unit="video", disable=not (progress and env.is_main))
    for items in loader:
        good = [it for it in items if "error" not in it]
        for it in items:
            if "error" in it:
                log.warning("skipped unreadable video %s (%s)", it["id"], it["error"])
                p_failed.append({"id": it["id"], "path": it["path"], "error": it["error"], **it.get("signature", {})})
        if good:
            # the evaluation's computation (vop.runtime), so an index of a split ranks as `vop eval` does
            e = embed_video_batch(model, torch.stack([it["video"] for it in good]), dev, dtype).numpy()
            finite = np.isfinite(e.reshape(len(e), -1)).all(1)
            for it, ok in zip(good, finite):
                if not ok:  # NaN/inf never enters an index: the video is listed as failed, like an unreadable one
                    log.warning("not indexed: %s (the model gave NaN/inf)", it["id"])
                    p_failed.append({"id": it["id"], "path": it["path"], "error": nonfinite_error(it["path"]),
                                     **it.get("signature", {})})
            if not finite.all():
                good, e = [it for it, ok in zip(good, finite) if ok], e[finite]
            if good:
                p_emb.append(e)
                p_entries.extend(_entry(it, plan.by_id[it["id"]]) for it in good)
                encoded += len(good)
        bar.update(len(items))
        if len(p_entries) + len(p_failed) >= flush_videos or time.monotonic() - last_flush > flush_seconds:
            _write_part(plan.parts_dir, env.rank, p_emb, p_entries, p_failed)
            p_emb, p_entries, p_failed, last_flush = [], [], [], time.monotonic()
            n_parts += 1
            if stop_after is not None and n_parts >= stop_after:
                os._exit(3)  # tests (TEST_STOP_ENV): an abrupt kill after some work was saved
    if p_entries or p_failed:
        _write_part(plan.parts_dir, env.rank, p_emb, p_entries, p_failed)
    bar.close()
    return encoded


@dataclass
class _Merged:
    """The next generation: ``emb`` row i = ``entries[i]``, in source order; unreadable videos; the parts merged."""

    emb: np.ndarray
    entries: list[dict]
    failed: dict[str, dict]
    parts: list[tuple[np.ndarray, list[dict], list[dict]]]

    @property
    def ids(self) -> set[str]:
        return {e["id"] for e in self.entries}


def _merge(plan: _Plan, retry_failed: bool, row_shape: tuple[int, ...]) -> _Merged:
    """Phase 5 (rank 0): the current generation and every part (in the order they were written: later
    wins), restricted to the source's unchanged videos, in source order. ``row_shape``: one video's
    embedding, (D,) or (F, D) for a pairwise model; a part of another shape (left by a run with another
    model) is refused."""
    parts = _read_parts(plan.parts_dir)
    for emb, entries, _ in parts:
        if entries and tuple(emb.shape[1:]) != tuple(row_shape):
            raise DataError(f"{plan.parts_dir}: holds videos encoded as {tuple(emb.shape[1:])} embeddings, this model "
                            f"gives {tuple(row_shape)} (a run with another model was interrupted here): pass --rebuild")
    rows: dict[str, tuple[np.ndarray, dict]] = {}
    failed: dict[str, dict] = {}
    if plan.base_emb is not None:
        for e, v in zip(plan.base_entries, plan.base_emb):
            if plan.unchanged(e):
                rows[e["id"]] = (v, e)
        for e in plan.base_failed:
            if plan.unchanged(e) and e["id"] not in rows and not retry_failed:
                failed[e["id"]] = e
    for emb, entries, fails in parts:
        for e, v in zip(entries, emb):
            if plan.unchanged(e):
                if not np.isfinite(v).all():  # a part of an older vop: NaN/inf never enters the index
                    rows.pop(e["id"], None)
                    failed[e["id"]] = {**{k: e[k] for k in ("id", "path", "size", "mtime_ns", "sha256") if k in e},
                                       "error": nonfinite_error(e["path"])}
                    continue
                rows[e["id"]] = (v, e)
                failed.pop(e["id"], None)
        for e in fails:
            if plan.unchanged(e):
                rows.pop(e["id"], None)
                failed[e["id"]] = e
    order = [s.id for s in plan.sources if s.id in rows]  # source order: a resumed build equals a fresh one
    emb = np.stack([rows[i][0] for i in order]) if order else np.zeros((0, *row_shape), np.float32)
    return _Merged(emb, [rows[i][1] for i in order], failed, parts)


def _write(tgt: _Target, plan: _Plan, merged: _Merged, new_meta: dict[str, Any], run: dict[str, Any], *,
           videos: str | os.PathLike, split: str, rebuild: bool, removed: int, faiss: str | None,
           faiss_params: dict[str, Any] | None) -> dict | None:
    """Phase 6 (rank 0): write the next generation if anything changed, clear the merged parts, rename
    a new index into place. Returns the index's FAISS settings."""
    old = tgt.old
    faiss_meta = old.get("faiss") if (old is not None and faiss is None) else None
    if faiss in ("ivf", "hnsw"):
        faiss_meta = {"kind": faiss, "params": dict(faiss_params or {})}
    elif faiss_meta is not None and faiss_params:
        faiss_meta = {"kind": faiss_meta["kind"], "params": {**faiss_meta["params"], **faiss_params}}
    if new_meta.get("pairwise"):
        if faiss_meta is not None or faiss_params:
            log.warning("no FAISS index for %s: the model %s", tgt.target, NO_ANN_FOR_PAIRWISE)
        faiss_meta, faiss_params = None, None
    changed = (old is None or rebuild or bool(merged.parts) or removed > 0 or faiss is not None
               or len(merged.entries) != old.get("count") or bool(faiss_params)
               or (old.get("faiss") is not None and faiss_meta is None)
               or old.get("checksums") is None or not old.get("model", {}).get("files"))  # an older vop's: add them
    if not changed:
        return old.get("faiss")
    meta = write_index(tgt.out, merged.emb, merged.entries, {
        **new_meta, "source": {"videos": str(Path(videos).resolve()), "split": split},
        "failed": list(merged.failed.values()), "missing": [{"id": k, "error": v} for k, v in plan.missing.items()],
        "faiss": faiss_meta, "last_run": run}, old=old)
    for p in plan.parts_dir.glob("r*.npz"):
        p.unlink()
    if tgt.out != tgt.target:
        _move_into_place(tgt.out, tgt.target)
    return meta.get("faiss")


_BUILDING = ".vop-building"


def building_path(out: str | os.PathLike) -> Path:
    """Where a new index is built (next to ``out``, hidden) before it is renamed to ``out``; a run
    killed midway leaves its encoded parts there, and the next run goes on from them."""
    out = Path(out)
    return out.parent / f".{out.name}{_BUILDING}"


def _holds_files(folder: Path, allowed: tuple[str, ...] = ("parts", "thumbs")) -> bool:
    return folder.is_dir() and any(p.name not in allowed for p in folder.iterdir())


def _move_into_place(work: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # an empty folder the user made for the index (anything in it: OSError, nothing lost)
    os.replace(work, out)


def write_index(out: str | os.PathLike, emb: np.ndarray, entries: list[dict], meta: dict[str, Any],
                old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a new generation of ``out`` (embeddings, entries, optional FAISS index), switch ``index.json``
    to it, then remove the previous generation and thumbnails nothing refers to any more.

    ``meta`` needs ``model`` and ``settings`` (see :func:`build_index`); ``faiss`` = None or
    ``{"kind": "ivf"|"hnsw", "params": {...}}``. Also used by the benchmark to write synthetic indexes.
    ``emb`` (N, F, D): the per-frame embeddings of a pairwise model (``pairwise: true`` is recorded, with
    ``frames_per_video``; no FAISS index can be built over them).
    """
    from vop._version import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = old if old is not None else read_meta(out)
    gen = int(old.get("generation", 0)) + 1 if old else 1
    created = old.get("created") if old and isinstance(old.get("created"), str) else None
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim not in (2, 3) or emb.shape[0] != len(entries):
        raise ValueError(f"{emb.shape[0]} embeddings for {len(entries)} entries")
    pairwise = emb.ndim == 3
    if meta.get("pairwise", pairwise) != pairwise:
        raise ValueError(f"embeddings of shape {emb.shape} for an index with pairwise={meta.get('pairwise')}")
    if pairwise and meta.get("faiss"):
        raise ConfigError(f"no FAISS index over per-frame embeddings: a pairwise model {NO_ANN_FOR_PAIRWISE}")
    finite = np.isfinite(emb.reshape(len(emb), -1)).all(1) if len(emb) else np.ones(0, bool)
    if not finite.all():  # NaN/inf never enters an index (build_index lists such videos as failed before this)
        bad = [entries[i].get("id") for i in np.flatnonzero(~finite)[:5]]
        raise DataError(f"{out}: {int((~finite).sum())} embeddings hold NaN or inf values (videos {', '.join(map(repr, bad))}); "
                        "an index never stores them")
    files = {"embeddings": f"embeddings-{gen}.npy", "videos": f"videos-{gen}.jsonl"}
    _atomic_save_npy(out / files["embeddings"], emb)
    _atomic_write(out / files["videos"], "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8"))
    faiss_meta = meta.get("faiss")
    if faiss_meta:
        from vop.retrieval.ann import build_faiss, save_faiss

        index, params = build_faiss(emb, faiss_meta["kind"], faiss_meta.get("params"))
        files["faiss"] = f"faiss-{gen}.index"
        save_faiss(index, out / files["faiss"])
        faiss_meta = {"kind": faiss_meta["kind"], "params": params, "file": files["faiss"]}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    checksums = {name: file_record(out / name) for name in files.values()}  # verified by VideoIndex.open
    full = {"format": FORMAT, "generation": gen, "vop_version": __version__, "created": created or now,
            "updated": now, "dim": int(emb.shape[-1]), "count": len(entries), **meta, "faiss": faiss_meta, "files": files,
            "checksums": checksums, "pairwise": pairwise}
    if pairwise:
        full["frames_per_video"] = int(emb.shape[1])
    _atomic_write(out / "index.json", json.dumps(full, indent=2, ensure_ascii=False).encode("utf-8"))
    # the old generation and unreferenced thumbnails go only after index.json points at the new one
    keep = set(files.values())
    for p in out.glob("*"):
        if p.is_file() and p.name != "index.json" and p.name.split("-")[0] in ("embeddings", "videos", "faiss") and p.name not in keep:
            p.unlink()
    thumbs = out / "thumbs"
    if thumbs.is_dir():
        used = {e.get("thumb") for e in entries}
        for p in thumbs.iterdir():
            if p.name not in used and not p.name.startswith("."):
                p.unlink()
    return full
