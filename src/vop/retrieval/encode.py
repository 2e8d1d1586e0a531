"""Encoding videos for an index (phase 4 of :func:`vop.retrieval.build.build_index`): decode each video as
the evaluation does (test sampling, resize, centre crop), make its thumbnail strip, turn each batch into
rows with the model's scoring (:func:`vop.runtime.embed_video_batch`, the evaluation's computation) and
flush them to ``parts/`` as they are done, so that an interrupted run loses at most one part. A video
that cannot be decoded, or whose row holds NaN/inf, is listed as failed (with the reason), never stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vop.errors import DataError
from vop.retrieval.format import atomic_write
from vop.retrieval.sources import Source, file_signature

__all__ = ["EncodeSettings", "encode_share", "read_parts", "nonfinite_error", "TEST_STOP_ENV"]

log = logging.getLogger("vop.retrieval")


@dataclass
class EncodeSettings:
    """How videos are turned into model input and thumbnails (the index's ``settings``)."""


    frames: int
    image_size: int
    thumb_frames: int
    thumb_height: int
    content_hash: bool
    #: the backbone's preprocessing (vop.backbone.config.Preprocess: how frames are resized); None: CLIP's
    preprocess: Any = None


class _IndexItems(Dataset):
    """One item per video: model frames (test sampling, resized + cropped), info and a thumbnail strip."""

    def __init__(self, sources: Sequence[Source], s: EncodeSettings, thumb_dir: Path):
        self.sources, self.s, self.thumb_dir = list(sources), s, thumb_dir

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        from vop.data.decode import VideoReader, sample_indices
        from vop.data.transforms import resize_frames
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
        out["video"] = resize_frames(x, s.image_size, s.preprocess).contiguous()
        strip = thumbnail_strip(frames[pick_thumb_frames(len(frames), s.thumb_frames)], s.thumb_height)
        data, ext = encode_image(strip)
        key = hashlib.sha1(json.dumps([src.id, out["signature"]], sort_keys=True).encode()).hexdigest()[:20]
        name = f"{key}{ext}"
        atomic_write(self.thumb_dir / name, data)
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


def read_parts(parts: Path) -> list[tuple[np.ndarray, list[dict], list[dict]]]:
    out = []
    for p in sorted(parts.glob("r*.npz"), key=lambda p: (int(p.name.split("-")[1]), p.name)):
        try:
            with np.load(p) as z:
                out.append((z["emb"].astype(np.float32), json.loads(z["entries"].tobytes()), json.loads(z["failed"].tobytes())))
        except Exception as e:  # a part is written atomically; anything else in there is not ours
            log.warning("ignoring unreadable part %s (%s)", p, e)
    return out


#: Test hook, not a setting: with ``VOP_TEST_STOP_AFTER_PARTS=N`` in the environment, :func:`build_index`
#: ends the process abruptly (``os._exit(3)``: no merge, no cleanup) once it has flushed N parts, as a
#: kill would. tests/test_retrieval_index.py sets it in a subprocess to test resuming a killed run.
TEST_STOP_ENV = "VOP_TEST_STOP_AFTER_PARTS"


def _test_stop_after_parts() -> int | None:
    value = os.environ.get(TEST_STOP_ENV, "").strip()
    return int(value) if value else None


def encode_share(mine: Sequence[Source], by_id: dict[str, Source], parts_dir: Path, thumb_dir: Path, model,
                 dev: torch.device, settings: EncodeSettings, env, *, batch_size: int, num_workers: int,
                 flush_videos: int, flush_seconds: float, progress: bool) -> int:
    """Encode ``mine`` (this rank's share of the videos; ``by_id``: every source video), flushing parts to
    ``parts_dir`` as it goes and thumbnails to ``thumb_dir``; the number encoded."""
    from vop.runtime import autocast_dtype, embed_video_batch

    if not mine:
        return 0
    stop_after = _test_stop_after_parts()
    encoded = 0
    model.eval()
    dtype = autocast_dtype(dev)
    ds = _IndexItems(mine, settings, thumb_dir)
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
                p_entries.extend(_entry(it, by_id[it["id"]]) for it in good)
                encoded += len(good)
        bar.update(len(items))
        if len(p_entries) + len(p_failed) >= flush_videos or time.monotonic() - last_flush > flush_seconds:
            _write_part(parts_dir, env.rank, p_emb, p_entries, p_failed)
            p_emb, p_entries, p_failed, last_flush = [], [], [], time.monotonic()
            n_parts += 1
            if stop_after is not None and n_parts >= stop_after:
                os._exit(3)  # tests (TEST_STOP_ENV): an abrupt kill after some work was saved
    if p_entries or p_failed:
        _write_part(parts_dir, env.rank, p_emb, p_entries, p_failed)
    bar.close()
    return encoded
