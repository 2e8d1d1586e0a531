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
- **Several processes** (``torchrun --nproc_per_node N -m vop.cli.main index ...``, on one machine or
  several: ``--nnodes``, with ``--out`` on a folder every node sees): each rank encodes every N-th
  remaining video and writes its own parts; rank 0 merges and writes, into the folder or the Milvus
  collection (the only rank that connects to the store: a Milvus Lite file is opened by one process).
- **Stores** (:mod:`vop.retrieval.store`): the rows go to the index folder (``faiss``, the default) or a
  Milvus collection (``--store milvus://...``: new and changed videos upserted, removed ones deleted);
  the approximate index is chosen by ``--ann`` (``auto``: by the collection's size).

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

from vop.errors import CheckpointError, ConfigError, DataError, MissingDependencyError, VopError
from vop.retrieval.encode import EncodeSettings, encode_share, nonfinite_error, read_parts
from vop.retrieval.format import StoredScoring, building_path, read_index, read_meta, write_index
from vop.retrieval.provenance import checkpoint_info, load_index_model
from vop.retrieval.sources import Source, file_signature, list_sources, same_file
from vop.retrieval.store import ANN_CHOICES, AnnChoice, ResolvedAnn, StoreSpec

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
    faiss: dict | None = None  # the FAISS index (kind, params) of an index in the folder
    store: str = "faiss"     # where the rows are: faiss (the folder) or the milvus:// URI
    ann: dict | None = None  # the approximate index chosen: choice, kind (exact, ivf, ivfpq, hnsw), why; params
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
    store: str | StoreSpec | None = None,
    ann: str | None = None,
    thumb_frames: int = 5,
    thumb_height: int = 96,
    flush_videos: int = 256,
    flush_seconds: float = 60.0,
    progress: bool = True,
) -> BuildReport:
    """Encode every video of ``videos`` (a folder, or a collection annotation file) with the model of
    ``checkpoint`` into the index folder ``out``; resumable and incremental (see the module docstring).

    ``store``: where the rows go (:class:`~vop.retrieval.store.StoreSpec` or its text: ``"faiss"``, the index
    folder; ``"milvus:///PATH/x.db[/COLLECTION]"``, ``"milvus://HOST:PORT[/COLLECTION]"``); None keeps the
    index's (the folder for a new index). Another store than the index's moves its rows there, without
    encoding them again.

    ``ann`` (or its older name ``faiss``): the approximate index, in either store: None keeps the index's
    choice (``"auto"`` for a new index: exact search below 250,000 videos, IVF-Flat, then IVF-PQ from 4M,
    parameters from the size; see :class:`~vop.retrieval.store.AnnChoice`), ``"exact"`` (or ``"none"``)
    removes it, ``"ivf"``/``"ivfpq"``/``"hnsw"`` choose it, with ``faiss_params`` (nlist, nprobe / m,
    nbits, rerank, opq / M, ef_construction, ef_search) winning over the derived ones. The rows are the
    model's scoring's (``model.scoring``): where it has no approximate index (cma's query score: per-frame
    embeddings), ``"ivf"``/``"ivfpq"``/``"hnsw"`` and a Milvus store are a ConfigError (before any video is
    decoded) and a kept setting is dropped. Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0
    merges, writes (it alone connects to a Milvus store) and returns the full report.

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
    writer = None  # rank 0's connection to a Milvus store
    try:
        flag, kind = _ann_arg(ann, faiss)
        _check_args(batch_size, thumb_frames, thumb_height, kind, flag)
        spec_arg = StoreSpec.parse(store) if isinstance(store, str) else store
        model, dev, info = _load_model(checkpoint, backbone, device, env)
        scoring = model.scoring
        if scoring.no_ann and kind in ("ivf", "ivfpq", "hnsw"):
            raise ConfigError(f"{flag} {kind}: {checkpoint} is a {info['method']} model that {scoring.no_ann}; "
                              f"leave out {flag} (or pass {flag} none)")
        if scoring.no_ann and spec_arg is not None and spec_arg.is_milvus:
            raise ConfigError(f"--store {spec_arg.uri}: {checkpoint} is a {info['method']} model that {scoring.no_ann}: "
                              "a Milvus collection holds one vector per video; leave out --store (its rows stay in the "
                              "index folder, --store faiss)")
        if kind in ("ivf", "ivfpq", "hnsw") and not (spec_arg is not None and spec_arg.is_milvus):
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
        spec = _store_for(spec_arg, tgt.old, tgt.target)
        if scoring.no_ann and spec.is_milvus:  # a recorded Milvus store, rebuilt with such a model
            raise ConfigError(f"{out}: its rows are in {spec.uri}, which holds one vector per video, and {checkpoint} is "
                              f"a {info['method']} model that {scoring.no_ann}: pass --store faiss (with --rebuild)")
        writer = _open_store(spec, tgt, env, rebuild)
        plan = _plan(tgt, videos, env, split=split, root=root, content_hash=content_hash, rebuild=rebuild,
                     retry_failed=retry_failed)
        report = BuildReport(tgt.target, rank=env.rank, missing=plan.missing, skipped=plan.skipped, scoring=scoring.kind,
                             rows=scoring.rows_label, no_ann=scoring.no_ann, store=spec.uri)
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
        written = _write(tgt, plan, merged, new_meta, run, videos=videos, split=split, rebuild=rebuild,
                         removed=report.removed, ann=kind, faiss_params=faiss_params, no_ann=scoring.no_ann,
                         spec=spec, writer=writer)
        report.faiss, report.ann = written.get("faiss"), written.get("ann")
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
        if writer is not None:
            writer.close()
        if own_group:
            dist.destroy_process_group()


def _store_for(spec: StoreSpec | None, old: dict | None, target: Path) -> StoreSpec:
    """The store a run writes into: the one asked for (a Milvus file or server without a collection name: the
    index's collection if it is already there, else ``vop_`` + the folder's name), else the index's."""
    if spec is None:
        return StoreSpec.of(old)
    if spec.is_milvus and spec.collection is None:
        from dataclasses import replace

        from vop.retrieval.store import default_collection

        rec = StoreSpec.of(old)
        same = rec.is_milvus and (rec.lite, rec.host, rec.port) == (spec.lite, spec.host, spec.port)
        return replace(spec, collection=rec.collection if same else default_collection(target))
    return spec


def _ann_arg(ann: str | None, faiss: str | None) -> tuple[str, str | None]:
    """(the option's name, for messages; the approximate index asked for, None: keep the index's)."""
    if ann is not None and faiss is not None and ann != faiss:
        raise ConfigError(f"--ann {ann} and --faiss {faiss}: give one of them (--faiss is --ann's older name)")
    return ("--faiss", faiss) if faiss is not None else ("--ann", ann)


def _check_args(batch_size: int, thumb_frames: int, thumb_height: int, kind: str | None, flag: str = "--ann") -> None:
    if batch_size < 1 or thumb_frames < 1 or thumb_height < 2:
        raise ConfigError("batch size, thumbnail frames and height must be positive")
    if kind is not None and kind not in ("none",) + ANN_CHOICES:
        raise ConfigError(f"{flag} must be one of none, {', '.join(ANN_CHOICES)}, got {kind!r}")


_ERRORS = {c.__name__: c for c in (ConfigError, DataError, CheckpointError, MissingDependencyError, VopError)}


def _open_store(spec: StoreSpec, tgt: "_Target", env, rebuild: bool):
    """Before anything is encoded: rank 0 connects to a Milvus store and checks its collection (free, or this
    index's); the other ranks learn the outcome, so that every rank stops with the same error."""
    import torch.distributed as dist

    if not spec.is_milvus:
        return None
    writer, err = None, None
    if env.is_main:
        from vop.retrieval.milvus import open_for_write

        try:
            writer = open_for_write(spec, tgt.target, tgt.old, rebuild)
        except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must not wait for rank 0 forever
            err = e
    if env.enabled:
        box = [None if err is None else (type(err).__name__, str(err))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and err is None:
            name, msg = box[0]
            err = _ERRORS.get(name, RuntimeError)(msg)
    if err is not None:
        raise err
    return writer


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
    base_emb: np.ndarray | None = None  # None with base entries: their rows are in a Milvus collection
    has_base: bool = False
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
        plan.has_base = True

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
    """The next generation: ``entries`` in source order, ``vectors[i]`` the row of ``entries[i]`` (None: it is
    in the index's Milvus collection, not here; :meth:`stacked` when all are here); the ids encoded by this run
    (``fresh``); unreadable videos; the parts merged."""

    entries: list[dict]
    failed: dict[str, dict]
    parts: list[tuple[np.ndarray, list[dict], list[dict]]]
    vectors: list[np.ndarray | None] = field(default_factory=list)
    fresh: set[str] = field(default_factory=set)
    row_shape: tuple[int, ...] = ()
    parts_dir: Path | None = None

    @property
    def ids(self) -> set[str]:
        return {e["id"] for e in self.entries}

    @property
    def local(self) -> bool:
        """Every row is here (none only in the index's Milvus collection)."""
        return all(v is not None for v in self.vectors)

    def stacked(self) -> np.ndarray:
        """The rows (every one local) as one array (:func:`_stack_rows`: memory-mapped when large)."""
        return _stack_rows(self.vectors, self.row_shape, self.parts_dir)


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
    rows: dict[str, tuple[np.ndarray | None, dict]] = {}
    failed: dict[str, dict] = {}
    fresh: set[str] = set()
    if plan.has_base:
        base = plan.base_emb if plan.base_emb is not None else [None] * len(plan.base_entries)
        for e, v in zip(plan.base_entries, base):
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
                    fresh.discard(e["id"])
                    failed[e["id"]] = {**{k: e[k] for k in ("id", "path", "size", "mtime_ns", "sha256") if k in e},
                                       "error": nonfinite_error(e["path"])}
                    continue
                rows[e["id"]] = (v, e)
                fresh.add(e["id"])
                failed.pop(e["id"], None)
        for e in fails:
            if plan.unchanged(e):
                rows.pop(e["id"], None)
                fresh.discard(e["id"])
                failed[e["id"]] = e
    order = [s.id for s in plan.sources if s.id in rows]  # source order: a resumed build equals a fresh one
    vectors = [rows[i][0] for i in order]
    return _Merged([rows[i][1] for i in order], failed, parts, vectors, fresh & set(order), tuple(row_shape),
                   plan.parts_dir)


#: the merged rows of a re-run are written into a memory-mapped file next to the parts from this many rows
#: per block (the rows of a large index are memory-mapped views: stacking them would hold every row in memory)
_MERGE_BLOCK = 65_536
MERGED_FILE = "merged.npy"


def _stack_rows(vectors: list[np.ndarray], row_shape: tuple[int, ...], parts_dir: Path) -> np.ndarray:
    """The rows as one (N, *row_shape) float32 array: in memory below
    :data:`~vop.retrieval.format.MMAP_FROM` bytes, else a memory-mapped ``merged.npy`` in ``parts_dir`` filled
    block by block (memory holds one block; ``write_index`` reads it in chunks; removed after the write)."""
    from vop.retrieval import format as fmt

    if not vectors:
        return np.zeros((0, *row_shape), np.float32)
    if 4 * len(vectors) * int(np.prod(row_shape)) < fmt.MMAP_FROM:
        return np.stack(vectors)
    parts_dir.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(parts_dir / MERGED_FILE, mode="w+", dtype=np.float32,
                                    shape=(len(vectors), *row_shape))
    for s in range(0, len(vectors), _MERGE_BLOCK):
        block = vectors[s:s + _MERGE_BLOCK]
        out[s:s + len(block)] = np.stack(block)
    out.flush()
    return out


def _choice(old: dict | None, kind: str | None, params: dict[str, Any] | None) -> AnnChoice:
    """The approximate index asked for: ``kind`` (with ``params``), else the index's recorded choice (with
    ``params`` over its explicit ones), else ``auto``."""
    recorded = AnnChoice.of(old)
    if kind is not None:
        return AnnChoice.parse(kind, params)
    if recorded is not None:
        return AnnChoice(recorded.choice, {**recorded.params, **{k: v for k, v in (params or {}).items() if v is not None}})
    return AnnChoice.parse("auto", params)


def _resolved_of(meta: dict) -> tuple[str, dict]:
    """The approximate index (kind, parameters) an index.json records, whichever its store."""
    rec = meta.get("store") if isinstance(meta.get("store"), dict) else {}
    if rec.get("kind") == "milvus":
        return rec["index"]["kind"], dict(rec["index"]["params"])
    f = meta.get("faiss")
    return (f["kind"], dict(f["params"])) if f else ("exact", {})


def _fetcher(old: dict | None, spec: StoreSpec):
    """The rows of videos that are in the index's current Milvus collection (to move them into ``spec``)."""
    def fetch(ids: list[str]) -> np.ndarray:
        from vop.retrieval.milvus import MilvusStore

        src = StoreSpec.of(old)
        if not ids:
            return np.zeros((0, 0), np.float32)
        if not src.is_milvus:
            raise DataError(f"the rows of {len(ids)} videos are missing: pass --rebuild")
        store = MilvusStore.connect(src)
        try:
            store.load()
            return store.vectors_by_id(ids)
        finally:
            if src.lite is None or src.lite != spec.lite:
                store.close()
            else:
                store.client.close()

    return fetch


def _write(tgt: _Target, plan: _Plan, merged: _Merged, new_meta: dict[str, Any], run: dict[str, Any], *,
           videos: str | os.PathLike, split: str, rebuild: bool, removed: int, ann: str | None,
           faiss_params: dict[str, Any] | None, no_ann: str | None = None, spec: StoreSpec = StoreSpec(),
           writer: Any = None) -> dict[str, Any]:
    """Phase 6 (rank 0): write the next generation if anything changed (into the folder, or the Milvus
    collection ``writer`` is connected to, and the folder), clear the merged parts, rename a new index into
    place. Returns ``{"faiss": the index's FAISS settings, "ann": its approximate-index record}``. ``no_ann``:
    why the model's scoring has no approximate index (a kept or asked-for one is then dropped, with a
    warning)."""
    old = tgt.old
    choice = _choice(old, ann, faiss_params)
    dim = int(new_meta["scoring"]["row_shape"][-1])
    n = len(merged.entries)
    if no_ann:
        if choice.choice not in ("auto", "exact") or faiss_params:
            log.warning("no FAISS index for %s: the model %s", tgt.target, no_ann)
        choice, faiss_params = AnnChoice("auto"), None
        resolved = ResolvedAnn("exact", {}, "the model's scores have no approximate index")
    else:
        resolved = choice.resolve(n, dim)
    if not spec.is_milvus and not resolved.exact and choice.choice == "auto":
        try:
            from vop.retrieval.ann import require_faiss

            require_faiss()
        except ConfigError:
            log.warning("%s: %s videos: an approximate index would be chosen (%s), but FAISS is not installed "
                        "(pip install 'vop[index]'): exact search", tgt.target, f"{n:,}", resolved.kind)
            resolved = ResolvedAnn("exact", {}, f"{resolved.why}; FAISS not installed")
    faiss_meta = {"kind": resolved.kind, "params": dict(resolved.params)} if not (spec.is_milvus or resolved.exact) else None
    ann_rec = choice.record(resolved)
    old_spec = StoreSpec.of(old) if old is not None else None
    changed = (old is None or rebuild or bool(merged.parts) or removed > 0 or ann is not None
               or n != old.get("count") or bool(faiss_params)
               or _resolved_of(old) != (resolved.kind, dict(resolved.params))
               or not spec.same_place(old_spec)
               or old.get("checksums") is None or not old.get("model", {}).get("files"))  # an older vop's: add them
    if not changed:
        return {"faiss": old.get("faiss"), "ann": {**(old.get("ann") or ann_rec), "params": _resolved_of(old)[1]}}
    meta = {**new_meta, "source": {"videos": str(Path(videos).resolve()), "split": split},
            "failed": list(merged.failed.values()), "missing": [{"id": k, "error": v} for k, v in plan.missing.items()],
            "faiss": faiss_meta, "ann": ann_rec, "last_run": run}
    fetch = _fetcher(old, spec)
    if spec.is_milvus:
        from vop.retrieval.milvus import write_milvus

        written = write_milvus(writer, tgt.out, tgt.target, merged.entries, merged.vectors, merged.fresh,
                               {e["id"] for e in plan.base_entries}, meta, old, resolved, rebuild=rebuild, fetch_old=fetch)
    else:
        emb = merged.stacked() if merged.local else None
        if emb is None:  # moving out of a Milvus collection: its rows come back into the folder
            missing = [e["id"] for e, v in zip(merged.entries, merged.vectors) if v is None]
            got = dict(zip(missing, fetch(missing)))
            emb = np.stack([v if v is not None else got[e["id"]] for e, v in zip(merged.entries, merged.vectors)])
        written = write_index(tgt.out, emb, merged.entries, meta, old=old)
    for p in plan.parts_dir.glob("r*.npz"):
        p.unlink()
    (plan.parts_dir / MERGED_FILE).unlink(missing_ok=True)
    if tgt.out != tgt.target:
        _move_into_place(tgt.out, tgt.target)
    return {"faiss": written.get("faiss"), "ann": {**ann_rec, "params": dict(resolved.params)}}



def _holds_files(folder: Path, allowed: tuple[str, ...] = ("parts", "thumbs")) -> bool:
    return folder.is_dir() and any(p.name not in allowed for p in folder.iterdir())


def _move_into_place(work: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # an empty folder the user made for the index (anything in it: OSError, nothing lost)
    os.replace(work, out)
