"""One dataset implementation for every format: records in, samples of frames + text out.

A format adapter (``vop.data.formats``) only turns annotation files into :class:`Record` s.
:class:`VideoTextDataset` iterates every (video, caption) pair; its evaluation view gives the
unique videos (``videos``, ``video_dataset()``) and, for each caption, the index of its video
(``text_to_video``), so metrics can handle several captions per video.

A video that cannot be decoded never becomes a zero tensor: ``__getitem__`` returns a
:class:`FailedSample`, :func:`collate` drops it from the batch (listing it under ``"failed"``),
and :class:`VideoLoader` counts it and logs a warning naming the file, once per file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vop.data.cache_files import cache_file, read_cached
from vop.data.decode import load_frames
from vop.data.transforms import Preprocess, resize_frames
from vop.errors import ConfigError, DataError

__all__ = [
    "Record",
    "FailedSample",
    "VideoTextDataset",
    "VideoDataset",
    "collate",
    "EpochSampler",
    "VideoLoader",
    "build_loader",
]

log = logging.getLogger("vop.data")


@dataclass(frozen=True)
class Record:
    """One (video, caption) pair. ``meta`` holds format-specific extras (split, source line...)."""

    video_id: str
    video_path: Path
    caption: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class FailedSample:
    """Stands in for a sample whose video could not be read; :func:`collate` drops it."""

    index: int
    video_id: str
    path: str
    error: str


class _Frames:
    """Turns (video, sample key) into uint8 frames ``(F, 3, size, size)``; shared by both views.
    ``preprocess``: the backbone's (its resize and interpolation: shortest side + centre crop, or squash;
    None: CLIP's)."""

    def __init__(self, frames: int, size: int, train: bool, seed: int, cache_dir: str | os.PathLike | None,
                 preprocess: Preprocess | None = None):
        if frames < 1 or size < 1:
            raise ConfigError(f"frames and size must be >= 1, got frames={frames}, size={size}")
        self.frames, self.size, self.train, self.seed = frames, size, train, seed
        self.preprocess = preprocess
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.epoch = 0

    def read(self, video_id: str, path: Path, key: int) -> tuple[torch.Tensor, np.ndarray]:
        if self.cache_dir is not None and not self.train:
            cached = cache_file(self.cache_dir, video_id, self.frames, self.size,
                                self.preprocess.tag() if self.preprocess is not None else "")
            if cached.is_file():
                return read_cached(cached)
        rng = np.random.default_rng([self.seed, self.epoch, key]) if self.train else None
        frames, idx = load_frames(path, self.frames, train=self.train, generator=rng)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (F, 3, H, W)
        return resize_frames(x, self.size, self.preprocess).contiguous(), idx

    def sample(self, index: int, video_index: int, video_id: str, path: Path) -> dict | FailedSample:
        try:
            video, idx = self.read(video_id, path, index)
        except DataError as e:
            return FailedSample(index, video_id, str(path), str(e))
        return {
            "video": video,
            "video_id": video_id,
            "video_index": video_index,
            "index": index,
            "frame_indices": torch.from_numpy(np.asarray(idx, dtype=np.int64)),
        }


class _VideoBase(Dataset):
    _frames: _Frames

    frames = property(lambda self: self._frames.frames, doc="frames per video (F)")
    size = property(lambda self: self._frames.size, doc="side of the square frames")
    train = property(lambda self: self._frames.train, doc="random (train) or middle (test) sampling")
    preprocess = property(lambda self: self._frames.preprocess,
                          doc="the backbone's preprocessing the frames are resized for (None: CLIP's)")

    def set_epoch(self, epoch: int) -> None:
        """Train sampling draws new frames for each epoch."""
        self._frames.epoch = epoch


class VideoTextDataset(_VideoBase):
    """Every (video, caption) pair of ``records``; item = frames + caption.

    Item (a dict; see :func:`collate` for the batch): ``video`` uint8 ``(F, 3, size, size)``,
    ``text`` str, ``video_id`` str, ``video_index`` int (into ``videos``), ``index`` int (sample,
    = caption index), ``frame_indices`` int64 ``(F,)`` (the decoded frames' indices).

    ``train=True`` samples a random frame per segment, seeded by ``(seed, epoch, index)``: the
    same frames whatever the number of workers; call :meth:`set_epoch` (``VideoLoader`` does) to
    draw new frames each epoch. ``train=False``: the middle frame of each segment.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        frames: int = 12,
        size: int = 224,
        train: bool = False,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        name: str = "dataset",
        split: str = "",
        preprocess: Preprocess | None = None,
    ):
        if not records:
            raise DataError(f"{name} {split}: no sample (empty annotations, or every video missing)")
        self.records = list(records)
        self.name, self.split = name, split
        #: videos left out when the dataset was built ({video_id: reason}), see get_dataset
        self.dropped: dict[str, str] = {}
        #: why, in one word, for each of them: "missing", "undecodable" (verify manifest), "unreadable"
        self.dropped_kinds: dict[str, str] = {}
        #: samples (captions) of the split that went with the dropped videos, and per reason
        self.dropped_samples = 0
        self.dropped_samples_by_kind: dict[str, int] = {}
        self._frames = _Frames(frames, size, train, seed, cache_dir, preprocess)
        first: dict[str, int] = {}
        paths: list[Path] = []
        for r in self.records:
            if r.video_id not in first:
                first[r.video_id] = len(first)
                paths.append(Path(r.video_path))
        #: unique video ids, in order of first appearance
        self.videos: list[str] = list(first)
        #: file of each unique video
        self.video_paths: list[Path] = paths
        #: caption (or paragraph) of each sample
        self.captions: list[str] = [r.caption for r in self.records]
        #: for each caption/sample, the index of its video in ``videos``
        self.text_to_video = torch.tensor([first[r.video_id] for r in self.records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | FailedSample:
        v = int(self.text_to_video[index])
        item = self._frames.sample(index, v, self.videos[v], self.video_paths[v])
        if isinstance(item, dict):
            item["text"] = self.captions[index]
        return item

    def video_to_texts(self) -> list[list[int]]:
        """For each unique video, the indices of its captions."""
        out: list[list[int]] = [[] for _ in self.videos]
        for t, v in enumerate(self.text_to_video.tolist()):
            out[v].append(t)
        return out

    def meta_column(self, key: str, default: Any = None) -> list[Any]:
        """``record.meta[key]`` for every sample (e.g. ``temporal_group`` of the synthetic world)."""
        return [r.meta.get(key, default) for r in self.records]

    def without_videos(self, video_ids: Iterable[str]) -> "VideoTextDataset":
        """A copy without the samples of ``video_ids`` (e.g. gallery videos that failed to load:
        ``test.without_videos(loader.failures)``), with ``text_to_video`` renumbered."""
        drop = set(video_ids) & set(self.videos)
        f = self._frames
        ds = VideoTextDataset([r for r in self.records if r.video_id not in drop], frames=f.frames, size=f.size,
                              train=f.train, seed=f.seed, cache_dir=f.cache_dir, name=self.name, split=self.split,
                              preprocess=f.preprocess)
        ds.dropped = {**self.dropped, **{v: "left out after failing to load" for v in sorted(drop)}}
        ds.dropped_kinds = {**self.dropped_kinds, **{v: "unreadable" for v in drop}}
        ds.dropped_samples = self.dropped_samples + len(self) - len(ds)
        return ds

    def coverage(self) -> dict[str, Any]:
        """How much of the split this dataset holds: videos and samples of the split, how many were
        left out and why (``partial`` when any was)."""
        why: dict[str, int] = {}
        for v in self.dropped:
            k = self.dropped_kinds.get(v, "left out")
            why[k] = why.get(k, 0) + 1
        return {"split_videos": len(self.videos) + len(self.dropped), "split_texts": len(self) + self.dropped_samples,
                "left_out_videos": len(self.dropped), "left_out_texts": self.dropped_samples, "left_out_why": why,
                "partial": bool(self.dropped)}

    def video_dataset(self) -> "VideoDataset":
        """The gallery: one item per unique video (test sampling), for encoding each video once."""
        f = self._frames
        return VideoDataset(self.videos, self.video_paths, frames=f.frames, size=f.size, cache_dir=f.cache_dir,
                            preprocess=f.preprocess)

    def __repr__(self) -> str:
        return (f"VideoTextDataset({self.name!r}, split={self.split!r}, samples={len(self)}, "
                f"videos={len(self.videos)}, frames={self.frames}, size={self.size}, train={self.train})")


class VideoDataset(_VideoBase):
    """One item per video: ``video``, ``video_id``, ``video_index``, ``index``, ``frame_indices``."""

    def __init__(
        self,
        video_ids: Sequence[str],
        paths: Sequence[str | os.PathLike],
        *,
        frames: int = 12,
        size: int = 224,
        train: bool = False,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        preprocess: Preprocess | None = None,
    ):
        if len(video_ids) != len(paths):
            raise ValueError("video_ids and paths differ in length")
        self.videos = list(video_ids)
        self.video_paths = [Path(p) for p in paths]
        self._frames = _Frames(frames, size, train, seed, cache_dir, preprocess)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict | FailedSample:
        return self._frames.sample(index, index, self.videos[index], self.video_paths[index])


def collate(items: Sequence[dict | FailedSample]) -> dict:
    """Stack good items; list failed ones under ``"failed"``.

    Batch: ``video`` uint8 ``(B, F, 3, S, S)``; ``index``, ``video_index`` int64 ``(B,)``;
    ``frame_indices`` int64 ``(B, F)``; ``video_id`` list[str]; ``text`` list[str] (pairs
    only); ``failed`` list[:class:`FailedSample`]. ``B`` may be 0 when every item failed.
    """
    good = [x for x in items if isinstance(x, dict)]
    batch: dict[str, Any] = {"failed": [x for x in items if isinstance(x, FailedSample)]}
    if not good:
        batch.update(video=torch.empty(0, dtype=torch.uint8), index=torch.empty(0, dtype=torch.long),
                     video_index=torch.empty(0, dtype=torch.long), video_id=[])
        return batch
    batch["video"] = torch.stack([x["video"] for x in good])
    batch["frame_indices"] = torch.stack([x["frame_indices"] for x in good])
    batch["index"] = torch.tensor([x["index"] for x in good], dtype=torch.long)
    batch["video_index"] = torch.tensor([x["video_index"] for x in good], dtype=torch.long)
    batch["video_id"] = [x["video_id"] for x in good]
    if "text" in good[0]:
        batch["text"] = [x["text"] for x in good]
    return batch


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by ``(seed, epoch)`` (or in order), then the
    shard ``rank::world_size`` (padded by wrapping so that every rank gets the same count).

    ``global_batch`` (batches that drop the last incomplete one): only the first
    ``n // global_batch * global_batch`` indices of the order are sharded, no padding. Batch ``k``
    of every rank (``global_batch // world_size`` each) then holds the samples of batch ``k`` of one
    process, and there are as many: an epoch is the same on any number of processes."""

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 global_batch: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if global_batch is not None and (global_batch < 1 or global_batch % world_size):
            raise ValueError(f"global_batch {global_batch} is not a positive multiple of world_size {world_size}")
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.global_batch = global_batch
        self.epoch = 0
        self.skip = 0  # leading indices of this epoch to leave out (resuming mid-epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return np.arange(self.n)

    def _per_rank(self) -> int:
        if self.global_batch is not None:
            return self.n // self.global_batch * self.global_batch // self.world_size
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.world_size > 1 or self.global_batch is not None:
            per = self._per_rank()
            order = np.resize(order, per * self.world_size)[self.rank :: self.world_size]
        return iter(order[self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.skip)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize one video at a time; no oversubscription


class VideoLoader:
    """A ``DataLoader`` over a video dataset that survives bad videos, with seeded epochs.

    Each ``iter()`` runs one epoch (``epoch`` then advances; :meth:`set_epoch` to resume):
    the shuffle order and the train-time frame draws depend only on ``(seed, epoch, index)``,
    not on ``num_workers``. Batches are :func:`collate` dicts; failed items are removed (a batch
    can then be smaller than ``batch_size``), counted in ``skipped`` (samples) and ``failures``
    (``{video_id: FailedSample}``), and logged once per video; a batch in which every item failed
    is not yielded.
    """

    def __init__(
        self,
        dataset: VideoTextDataset | VideoDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        pin_memory: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        prefetch_factor: int | None = None,
    ):
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                                    global_batch=batch_size * world_size if drop_last else None)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            drop_last=drop_last,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            persistent_workers=False,  # workers copy the dataset at each epoch start: epoch reaches them
            **extra,
        )
        self.epoch = 0
        self.start_batch = 0
        self.batch_size = batch_size
        self.skipped = 0
        self.failures: dict[str, FailedSample] = {}
        #: the same, for the last (or current) epoch only
        self.epoch_skipped = 0
        self.epoch_failures: dict[str, FailedSample] = {}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` runs ``epoch``, starting at batch ``start_batch`` (resuming mid-epoch:
        the skipped batches are not decoded)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        self.sampler.set_epoch(self.epoch, self.start_batch * self.batch_size)
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        self.start_batch = 0
        self.epoch_skipped, self.epoch_failures = 0, {}
        for batch in self.loader:
            for f in batch["failed"]:
                self.skipped += 1
                self.epoch_skipped += 1
                self.epoch_failures.setdefault(f.video_id, f)
                if f.video_id not in self.failures:
                    self.failures[f.video_id] = f
                    log.warning("skipped unreadable video %s (%s)", f.video_id, f.error)
            if len(batch["video_id"]):
                yield batch


def build_loader(
    dataset: VideoTextDataset | VideoDataset,
    batch_size: int,
    *,
    shuffle: bool | None = None,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> VideoLoader:
    """A :class:`VideoLoader`; ``shuffle``/``drop_last`` default to True for train datasets."""
    return VideoLoader(
        dataset,
        batch_size,
        shuffle=dataset.train if shuffle is None else shuffle,
        num_workers=num_workers,
        seed=seed,
        drop_last=dataset.train if drop_last is None else drop_last,
        pin_memory=pin_memory,
        rank=rank,
        world_size=world_size,
    )
