"""``vop index``: build or update an index folder (:func:`build_index`).

The phases, in order: load the model (:func:`_load_model`), open the target folder (:func:`_open_target`),
plan what is left to encode (:func:`_plan`), encode this rank's share into parts
(:func:`~vop.retrieval.encode.encode_share`), then on rank 0 merge the index and every part (:func:`_merge`) and write the
next generation (:func:`_write`, with :func:`vop.retrieval.format.write_index`).

- **Atomic**: a new index is built in ``.INDEX.vop-building`` next to ``INDEX``
  (:func:`~vop.retrieval.format.building_path`) and renamed when complete: ``INDEX`` never appears
  half-built; an update writes a new generation and switches ``index.json`` to it.
- **Resumable**: encoded batches are flushed to ``parts/`` as they are done, so re-running after a
  crash or Ctrl-C encodes only what is left.
- **Incremental**: re-running on a changed folder encodes new and changed videos (size + mtime, or
  SHA-256 with ``content_hash``) and drops the removed ones.
- **Several processes** (``torchrun --nproc_per_node N -m vop.cli.main index ...``): each rank encodes
  every N-th remaining video and writes its own parts; rank 0 merges.

Frames are sampled and resized exactly as the evaluation engine does (test sampling: the middle frame
of each of F segments; short side resized to the model's input size, centre crop) and each batch
becomes rows through the model's scoring (:func:`vop.runtime.embed_video_batch`), so an index of a
dataset split ranks videos exactly as ``vop eval`` does. What a row is, whether an approximate (FAISS)
index applies, is the scoring's (:mod:`vop.scoring`) and recorded in ``index.json``.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vop.errors import ConfigError, DataError
from vop.retrieval.encode import EncodeSettings, encode_share, nonfinite_error, read_parts
from vop.retrieval.format import StoredScoring, building_path, read_index, read_meta, write_index
from vop.retrieval.provenance import checkpoint_info, load_index_model
from vop.retrieval.sources import Source, file_signature, list_sources, same_file

__all__ = ["build_index", "BuildReport"]

log = logging.getLogger("vop.retrieval")


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
    scoring: str = "cosine"  # the kind of scores (model.scoring.kind) the index holds rows of
    rows: str = "one vector per video"  # what a row is
    no_ann: str | None = None  # why the scoring has no approximate (FAISS) index (its search is exact); None: it has

    @property
    def videos_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _dist_env():
    from vop.engine.distributed import DistEnv

    return DistEnv.from_env()


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
    o, n = StoredScoring.of(old), StoredScoring.of(new)
    if o.kind != n.kind:
        diffs.append(f"scores {o.kind} (rows {o.row_shape}) vs {n.kind} (rows {n.row_shape})")
    if diffs:
        raise ConfigError(f"{path}: was built with different settings ({'; '.join(diffs)}); its embeddings cannot be "
                          "mixed with new ones: pass --rebuild to re-encode every video, or choose another --out")


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
    ef_search). The rows are the model's scoring's (``model.scoring``): where it has no approximate
    index (cma's query score: per-frame embeddings), ``"ivf"``/``"hnsw"`` is a ConfigError (before any
    video is decoded) and a kept setting is dropped. Under torchrun (WORLD_SIZE > 1) every rank calls
    this; rank 0 merges and returns the full report.

    The phases, in order: load the model (:func:`_load_model`), open the target folder
    (:func:`_open_target`), plan what is left to encode (:func:`_plan`), encode this rank's share into
    parts (:func:`~vop.retrieval.encode.encode_share`), then on rank 0 merge the index and every part (:func:`_merge`) and
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
        scoring = model.scoring
        if scoring.no_ann and faiss in ("ivf", "hnsw"):
            raise ConfigError(f"--faiss {faiss}: {checkpoint} is a {info['method']} model that {scoring.no_ann}; "
                              "leave out --faiss (or pass --faiss none)")
        if faiss in ("ivf", "hnsw"):
            from vop.retrieval.ann import require_faiss

            require_faiss()  # fail before encoding anything
        # before any folder is made or video decoded: can this model take that many frames?
        frames = model.check_frames(frames, str(checkpoint))
        if image_size is not None and image_size < 1:
            raise ConfigError(f"--image-size must be >= 1, got {image_size}")
        settings = EncodeSettings(frames, image_size or model.clip.cfg.vision.image_size, thumb_frames,
                                  thumb_height, content_hash, model.clip.preprocess)
        new_meta = {"model": info, "settings": {"frames": settings.frames, "image_size": settings.image_size,
                                                "max_words": max_words, "thumb_frames": thumb_frames,
                                                "thumb_height": thumb_height, "content_hash": content_hash},
                    "scoring": scoring.record(settings.frames, model.clip.cfg.embed_dim)}
        tgt = _open_target(Path(out), new_meta, env, rebuild)
        if tgt.building:
            work_dir = tgt.out
        plan = _plan(tgt, videos, env, split=split, root=root, content_hash=content_hash, rebuild=rebuild,
                     retry_failed=retry_failed)
        report = BuildReport(tgt.target, rank=env.rank, missing=plan.missing, skipped=plan.skipped, scoring=scoring.kind,
                             rows=scoring.rows_label, no_ann=scoring.no_ann)
        encoded = encode_share(plan.mine, plan.by_id, plan.parts_dir, plan.thumb_dir, model, dev, settings, env,
                               batch_size=batch_size, num_workers=num_workers, flush_videos=flush_videos,
                               flush_seconds=flush_seconds, progress=progress)
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

        merged = _merge(plan, retry_failed, scoring.row_shape(settings.frames, model.clip.cfg.embed_dim))
        report.total = len(merged.entries)
        report.reused = len(plan.done_ids & merged.ids)
        report.removed = sum(1 for e in plan.base_entries if e["id"] not in plan.by_id)
        report.failed = {i: e["error"] for i, e in merged.failed.items()}
        run = {"world_size": env.world_size, "encoded_per_rank": counts, "device": str(dev), "batch_size": batch_size}
        report.faiss = _write(tgt, plan, merged, new_meta, run, videos=videos, split=split, rebuild=rebuild,
                              removed=report.removed, faiss=faiss, faiss_params=faiss_params, no_ann=scoring.no_ann)
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
        _, base_emb, base_entries = read_index(out)
        plan.base_entries, plan.base_emb, plan.base_failed = base_entries, base_emb, tgt.old.get("failed") or []

    done_ids = plan.done_ids
    for e in plan.base_entries:
        if plan.unchanged(e):
            done_ids.add(e["id"])
    for _, entries, failed in read_parts(parts_dir):
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
    row (the model's scoring's: (D,), or (F, D) for cma's query score); a part of another shape (left by a
    run with another model) is refused."""
    parts = read_parts(plan.parts_dir)
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
           faiss_params: dict[str, Any] | None, no_ann: str | None = None) -> dict | None:
    """Phase 6 (rank 0): write the next generation if anything changed, clear the merged parts, rename
    a new index into place. Returns the index's FAISS settings. ``no_ann``: why the model's scoring has
    no FAISS index (a kept or asked-for one is then dropped, with a warning)."""
    old = tgt.old
    faiss_meta = old.get("faiss") if (old is not None and faiss is None) else None
    if faiss in ("ivf", "hnsw"):
        faiss_meta = {"kind": faiss, "params": dict(faiss_params or {})}
    elif faiss_meta is not None and faiss_params:
        faiss_meta = {"kind": faiss_meta["kind"], "params": {**faiss_meta["params"], **faiss_params}}
    if no_ann:
        if faiss_meta is not None or faiss_params:
            log.warning("no FAISS index for %s: the model %s", tgt.target, no_ann)
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



def _holds_files(folder: Path, allowed: tuple[str, ...] = ("parts", "thumbs")) -> bool:
    return folder.is_dir() and any(p.name not in allowed for p in folder.iterdir())


def _move_into_place(work: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # an empty folder the user made for the index (anything in it: OSError, nothing lost)
    os.replace(work, out)
