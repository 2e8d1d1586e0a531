"""A video index: one L2-normalised embedding per video (or, for a pairwise model, its per-frame
embeddings), its metadata and a thumbnail strip.

Layout of an index folder::

    INDEX/index.json            format, model (checkpoint path + SHA-256 + metadata, backbone), settings,
                                counts, failed/missing videos, FAISS settings, current file names,
                                ``pairwise`` (and ``frames_per_video`` when true)
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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
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
           "NO_ANN_FOR_PAIRWISE"]

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


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a prompt checkpoint; for the authors' ModelScope folder, of its configuration and weights."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    from vop.methods.modelscope import read_folder

    folder = read_folder(path)
    h = hashlib.sha256()
    for f in (folder.config, folder.weights):
        h.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


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
    import vop
    from vop.methods.checkpoint import backbone_record, checkpoint_facts

    path = Path(checkpoint)
    meta = vop.read_checkpoint_meta(path, backbone if path.is_dir() else None)
    whole = checkpoint_facts(path, meta).whole_model  # its file holds every weight: no backbone to record
    bb = backbone or meta.get("backbone")
    if bb is None and not whole:
        raise ConfigError(f"{path}: records no backbone; pass --backbone (the CLIP weights the prompts were trained on)")
    return {
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": checkpoint_sha256(path),
        "method": meta["method"],
        "options": meta["options"],
        "frames": meta["frames"],
        "arch_name": meta.get("arch_name"),
        "backbone": backbone_record(bb) if not whole else None,
        "backbone_fingerprint": meta.get("backbone_fingerprint"),
        "checkpoint_meta": meta,
    }


def load_index_model(info: dict[str, Any], *, backbone: Any = None, checkpoint: str | os.PathLike | None = None,
                     device: torch.device | str = "cpu", check_sha: bool = True):
    """Rebuild the model of ``checkpoint_info`` (optionally with another path for a moved checkpoint
    or backbone). The checkpoint must be the very file that was indexed (same SHA-256)."""
    import vop

    ckpt = Path(checkpoint or info["checkpoint"])
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: the index's prompt checkpoint is missing; pass --checkpoint with its new location")
    if check_sha and checkpoint_sha256(ckpt) != info["checkpoint_sha256"]:
        raise CheckpointError(
            f"{ckpt}: differs from the checkpoint this index was built with (SHA-256 {info['checkpoint_sha256'][:12]}...): "
            "its video embeddings would not match; re-run `vop index` with this checkpoint (into a new --out or with --rebuild)")
    bb = backbone if backbone is not None else info.get("backbone")
    model = vop.load_checkpoint(ckpt, bb)
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

    @classmethod
    def open(cls, path: str | os.PathLike) -> "VideoIndex":
        path = Path(path)
        meta = read_meta(path)
        if meta is None:
            raise DataError(f"{path}: not a vop index (no index.json); build one with `vop index --videos DIR --checkpoint CKPT --out {path}`")
        files = meta["files"]
        try:
            emb = np.load(path / files["embeddings"])
            with open(path / files["videos"], encoding="utf-8") as f:
                entries = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: index files unreadable ({e}); re-run `vop index` to repair it") from None
        pairwise = bool(meta.get("pairwise", False))
        want = f"(N, {meta.get('frames_per_video')}, {meta['dim']}) per-frame" if pairwise else f"(N, {meta['dim']})"
        if (emb.ndim != (3 if pairwise else 2) or emb.shape[0] != len(entries) or emb.shape[-1] != meta["dim"]
                or (pairwise and emb.shape[1] != meta.get("frames_per_video"))):
            raise DataError(f"{path}: {files['embeddings']} holds {emb.shape} but {files['videos']} lists {len(entries)} "
                            f"videos and index.json {want} embeddings; re-run `vop index` to repair it")
        return cls(path, meta, np.ascontiguousarray(emb, dtype=np.float32), entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def pairwise(self) -> bool:
        """Whether the index holds per-frame embeddings of a pairwise model (scored with its similarity)."""
        return bool(self.meta.get("pairwise", False))

    def check_model(self, model: Any) -> None:
        """Refuse a model whose kind of scores (pairwise or dual encoder) does not match the index's."""
        mp = bool(getattr(model, "pairwise", False))
        if mp != self.pairwise:
            kind = lambda p: "pairwise (per-frame embeddings)" if p else "dual-encoder (one vector per video)"  # noqa: E731
            raise ConfigError(f"{self.path}: a {kind(self.pairwise)} index, but the model ({type(model).__name__}) is "
                              f"{kind(mp)}: they cannot be mixed; re-run `vop index` with this model (--rebuild)")

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
            self._faiss = load_faiss(self.path / f["file"], f["kind"], f["params"])
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
        if self.pairwise:
            if model is None:
                raise ConfigError(f"{self.path}: a pairwise index ({self.model_info.get('method')}) is scored by its "
                                  "model's similarity: search it with vop.retrieval.Searcher (or pass model=)")
            self.check_model(model)
            q = (queries.detach().cpu().float() if torch.is_tensor(queries)
                 else torch.as_tensor(np.asarray(queries, dtype=np.float32)))
            if q.ndim == 1:
                q = q[None]
            if q.shape[1] != self.dim:
                raise ValueError(f"queries have dim {q.shape[1]}, the index {self.dim}")
            return pairwise_search(model, self.emb_tensor, q, k, cache=self.gallery_cache(model))
        q = queries.detach().cpu().float().numpy() if torch.is_tensor(queries) else np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index {self.dim}")
        k = max(0, min(int(k), len(self)))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        use_faiss = self.faiss_kind is not None and exact is not True
        if use_faiss:
            from vop.retrieval.ann import faiss_search

            scores, rows = faiss_search(self.faiss_index(nprobe=nprobe, ef_search=ef_search), q, k)
            return scores, rows.astype(np.int64)
        return exact_search(self.emb_tensor, torch.from_numpy(q), k)

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


def read_meta(path: Path) -> dict[str, Any] | None:
    f = path / "index.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{f}: not valid JSON ({e}); delete the folder and rebuild the index") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{f}: unknown index format {meta.get('format')!r} (expected {FORMAT})")
    return meta


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
    om, nm = old["model"], new["model"]
    diffs = []
    if om["checkpoint_sha256"] != nm["checkpoint_sha256"]:
        diffs.append(f"checkpoint {om['checkpoint']} (SHA-256 {om['checkpoint_sha256'][:12]}) vs {nm['checkpoint']} "
                     f"({nm['checkpoint_sha256'][:12]})")
    if om.get("backbone_fingerprint") != nm.get("backbone_fingerprint"):
        diffs.append(f"backbone weights {om.get('backbone_fingerprint')} vs {nm.get('backbone_fingerprint')}")
    for k in ("frames", "image_size"):
        if old["settings"][k] != new["settings"][k]:
            diffs.append(f"{k} {old['settings'][k]} vs {new['settings'][k]}")
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
    old = read_meta(out) if out.exists() else None
    if old is None and _holds_files(out, allowed=()):
        if _holds_files(out):
            raise ConfigError(f"{out}: is a folder that holds other files; give a new or empty folder for the index")
        if env.is_main and not work.exists():  # parts/ and thumbs/ left by an older vop: go on with them
            os.replace(out, work)
    if env.enabled:
        dist.barrier()
    if old is None:  # a new index is built next to the target and renamed at the end: never half there
        return _Target(target, work, work, None, True)
    if not rebuild:
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
        plan.base_entries, plan.base_emb, plan.base_failed = idx.entries, idx.emb, tgt.old.get("failed", [])

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
            p_emb.append(embed_video_batch(model, torch.stack([it["video"] for it in good]), dev, dtype).numpy())
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
               or (old.get("faiss") is not None and faiss_meta is None))
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
    from vop import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = old if old is not None else read_meta(out)
    gen = int(old.get("generation", 0)) + 1 if old else 1
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim not in (2, 3) or emb.shape[0] != len(entries):
        raise ValueError(f"{emb.shape[0]} embeddings for {len(entries)} entries")
    pairwise = emb.ndim == 3
    if meta.get("pairwise", pairwise) != pairwise:
        raise ValueError(f"embeddings of shape {emb.shape} for an index with pairwise={meta.get('pairwise')}")
    if pairwise and meta.get("faiss"):
        raise ConfigError(f"no FAISS index over per-frame embeddings: a pairwise model {NO_ANN_FOR_PAIRWISE}")
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
    full = {"format": FORMAT, "generation": gen, "vop_version": __version__, "created": (old or {}).get("created", now),
            "updated": now, "dim": int(emb.shape[-1]), "count": len(entries), **meta, "faiss": faiss_meta, "files": files,
            "pairwise": pairwise}
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
