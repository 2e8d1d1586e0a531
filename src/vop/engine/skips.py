"""What a training run loses to unreadable or missing videos: counted, logged, recorded, bounded.

Per epoch, the samples whose video could not be decoded (removed from their batch by
``vop.data.collate``) are summed over all processes, logged (``epoch 1: 1 video skipped (3 of 48
samples, 6.2%) ...``) and stored in the epoch's history entry; the run's results get the totals
and a warning is logged at the end. Videos whose file is missing when the dataset is built count
too (videos left out on purpose through a ``vop data verify`` manifest do not). When the lost
fraction of an epoch's samples exceeds ``data.max_skipped``, the run stops with a
:class:`~vop.errors.DataError` that says what was lost and what to do.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from vop.data.dataset import VideoLoader, VideoTextDataset
from vop.errors import DataError

__all__ = ["SkipTracker", "videos_skipped"]

log = logging.getLogger("vop.train")


def videos_skipped(n: int) -> str:
    return f"{n} video{'' if n == 1 else 's'} skipped"


def _short(error: str) -> str:
    """A decoding error without its generic advice (the run's message gives its own)."""
    return error.split(". Replace it with a working copy")[0].rstrip(".")


class SkipTracker:
    """Counts one training run's lost samples; resumable (:meth:`state_dict`)."""

    def __init__(self, dataset: VideoTextDataset, loader: VideoLoader, max_skipped: float, *, per_rank: int,
                 world_size: int = 1, hint: str = ""):
        self.loader, self.max_skipped, self.per_rank, self.world_size = loader, max_skipped, per_rank, world_size
        self.hint = hint
        missing = [v for v, k in dataset.dropped_kinds.items() if k == "missing"]
        self.missing_videos = len(missing)
        self.missing_samples = dataset.dropped_samples_by_kind.get("missing", 0)
        self.split_samples = len(dataset) + dataset.dropped_samples
        self.example_missing = next((dataset.dropped[v] for v in missing), "")
        self.failures: dict[str, str] = {}  # every video that failed in this run: {id: error}
        self.partial = {"samples": 0, "attempted": 0, "videos": {}}  # the current epoch, before a resume
        self._start_batch = 0

    # -- resumable state ----------------------------------------------------------------------
    def state_dict(self, batch: int) -> dict[str, Any]:
        """Everything counted so far, the current epoch up to ``batch`` included."""
        return {"failures": dict(self.failures), "partial": self._current(batch)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.failures = dict(state.get("failures", {}))
            self.partial = dict(state.get("partial", self.partial))

    # -- per epoch ----------------------------------------------------------------------------
    def check_before(self) -> None:
        """Missing files alone already over the limit: fail before any work."""
        if self.split_samples and self.missing_samples / self.split_samples > self.max_skipped:
            raise DataError(
                f"the training split lost {self.missing_samples} of {self.split_samples} samples "
                f"({self.missing_samples / self.split_samples:.1%}) to {self.missing_videos} missing video files, "
                f"e.g. {self.example_missing}; more than data.max_skipped={self.max_skipped:g} allows. Restore them, "
                f"or raise data.max_skipped to train on the rest")

    def start_epoch(self, start_batch: int = 0) -> None:
        self._start_batch, self._running = start_batch, True

    def _current(self, batch: int) -> dict[str, Any]:
        """This rank's counts of the current epoch up to ``batch`` (including those saved before a resume)."""
        if not getattr(self, "_running", False):  # between epochs: the loader's counts were used already
            return dict(self.partial)
        return {"samples": self.partial["samples"] + self.loader.epoch_skipped,
                "attempted": self.partial["attempted"] + (batch - self._start_batch) * self.per_rank,
                "videos": {**self.partial["videos"], **{v: f.error for v, f in self.loader.epoch_failures.items()}}}

    def end_epoch(self, epoch: int, batches: int, device: torch.device) -> dict[str, Any]:
        """Counts of the epoch that just ended (all ranks), logged; DataError above the limit."""
        cur = self._current(batches)
        samples, attempted, failed = cur["samples"], cur["attempted"], cur["videos"]
        if self.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor([samples, attempted], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            samples, attempted = int(t[0]), int(t[1])
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, failed)
            failed = {k: e for g in gathered for k, e in g.items()}
        videos = sorted(failed)
        self.failures.update(failed)
        self.partial, self._running = {"samples": 0, "attempted": 0, "videos": {}}, False
        lost, total = samples + self.missing_samples, attempted + self.missing_samples
        fraction = lost / total if total else 0.0
        entry = {"videos": len(videos), "samples": samples, "attempted": attempted, "missing_videos": self.missing_videos,
                 "missing_samples": self.missing_samples, "fraction": round(fraction, 6), "ids": videos}
        if videos:
            log.warning("epoch %d: %s (%d of %d samples, %.1f%%), e.g. %s", epoch, videos_skipped(len(videos)), samples,
                        attempted, 100 * samples / max(attempted, 1), _short(failed[videos[0]]))
        else:
            log.info("epoch %d: 0 videos skipped", epoch)
        if fraction > self.max_skipped:
            why = f"{videos_skipped(len(videos))} ({samples} of {attempted} samples)"
            if self.missing_samples:
                why += f" and {self.missing_videos} missing video files ({self.missing_samples} samples)"
            example = _short(failed[videos[0]] if videos else self.example_missing)
            raise DataError(
                f"epoch {epoch}: {fraction:.1%} of the training samples were lost, more than data.max_skipped="
                f"{self.max_skipped:g} allows: {why}, e.g. {example}; replace or re-encode those videos, leave them "
                f"out with a manifest ({self.hint or 'vop data verify'}), or raise data.max_skipped")
        return entry

    def summary(self, history: list[dict[str, Any]], test: dict[str, Any] | None = None) -> dict[str, Any]:
        """Totals for results.json, with a one-line ``message`` (``warn``: anything was lost)."""
        epochs = [h.get("skipped", {}) for h in history]
        n = len(self.failures)
        msg = videos_skipped(n)
        if n:
            msg += f" in training ({', '.join(sorted(self.failures)[:5])}{', ...' if n > 5 else ''}; samples lost per epoch: "
            msg += ", ".join(str(e.get("samples", 0)) for e in epochs) + ")"
        if self.missing_videos:
            msg += f"; {self.missing_videos} missing video files left out of training ({self.missing_samples} samples)"
        test_skipped = int((test or {}).get("skipped_videos", 0))
        if test_skipped:
            msg += f"; {test_skipped} test videos could not be decoded (test metrics are partial)"
        return {"videos": n, "ids": sorted(self.failures), "errors": dict(sorted(self.failures.items())),
                "samples_per_epoch": [e.get("samples", 0) for e in epochs], "missing_videos": self.missing_videos,
                "missing_samples": self.missing_samples, "test_videos": test_skipped, "max_skipped": self.max_skipped,
                "message": msg, "warn": bool(n or self.missing_videos or test_skipped)}
