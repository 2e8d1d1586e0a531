"""The training loop: one function, `train(cfg)`, the same on one CPU and under torchrun.

Run directory (``cfg.out_dir``):
    config.yaml        the resolved configuration (``--resume`` reads it back)
    versions.json      library, torch and Python versions, world size, device
    metrics.jsonl      one JSON object per log step and per evaluation
    tb/                TensorBoard events (when tensorboard is installed)
    state.pt           resumable state: trainable tensors, optimiser, scheduler, scaler, RNG, position
    state.prev.pt      the state before it (a damaged state.pt can be replaced by it)
    last.safetensors   prompt checkpoint of the last epoch
    best.safetensors   prompt checkpoint of the epoch selected on validation (never on test)
    results.json       test metrics of the last and of the val-selected epoch
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vop.backbone.config import get_arch, is_arch
from vop.data import augment_draws, build_loader, get_dataset, to_model_input
from vop.data.dataset import VideoTextDataset
from vop.engine.config import RunConfig, check_ranges, load_config, save_config
from vop.engine.distributed import DistEnv, all_reduce_mean
from vop.engine.evaluate import autocast_dtype, coverage_line, evaluate
from vop.engine.loss import accumulated_backward, contrastive_loss
from vop.engine.optim import cosine_with_warmup, param_groups
from vop.engine.skips import SkipTracker
from vop.errors import CheckpointError, ConfigError, DataError
from vop.methods import create_model, get_method, resolve_backbone
from vop.methods.checkpoint import load_trainable, save_checkpoint
from vop.methods.registry import parse_options

log = logging.getLogger("vop.train")


class _Pair(nn.Module):
    """What DDP wraps: forward returns the normalised (video, text) features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, video: torch.Tensor, tokens: torch.Tensor):
        return self.model(video, tokens)


@dataclass
class Datasets:
    train: VideoTextDataset
    val: VideoTextDataset | None
    val_note: str


# ----------------------------------------------------------------------------------------------
# validation of the configuration, before any work starts
# ----------------------------------------------------------------------------------------------
def check_config(cfg: RunConfig, world_size: int = 1) -> None:
    check_ranges(cfg)  # a config built in Python skips load_config's checks
    cls = get_method(cfg.model.method)
    parse_options(cfg.model.method, cls.Options, dict(cfg.model.options))
    o = cfg.optim
    if o.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} (the global contrastive batch) is not divisible by {world_size} processes")
    if (o.batch_size // world_size) % o.accumulate:
        raise ConfigError(f"the per-process batch {o.batch_size // world_size} is not divisible by optim.accumulate={o.accumulate}")
    if o.precision == "fp16" and o.accumulate > 1:
        raise ConfigError("optim.precision=fp16 with optim.accumulate > 1 is not supported: use bf16")
    if o.epochs < 0 or o.lr <= 0:
        raise ConfigError("optim.epochs must be >= 0 and optim.lr > 0")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not cfg.data.root:
        raise ConfigError("data.root is empty: give the dataset folder (data.root=DIR)")
    if cfg.optim.select_metric != "rsum" and "." not in cfg.optim.select_metric:
        raise ConfigError(f"optim.select_metric must be rsum or like t2v.R1, got {cfg.optim.select_metric!r}")
    if cfg.model.backbone_arch is not None:
        if is_arch(cfg.model.backbone) and not os.path.exists(cfg.model.backbone):
            raise ConfigError(f"model.backbone_arch names the architecture of a weights file, but model.backbone="
                              f"{cfg.model.backbone} is an architecture already (random weights)")
        try:
            get_arch(cfg.model.backbone_arch)
        except CheckpointError as e:
            raise ConfigError(f"model.backbone_arch: {e}") from None
    _check_model_options(cfg)


def _check_model_options(cfg: RunConfig) -> None:
    """Build the model on the meta device (no memory, no weights read), so that method options out of
    range (ks beyond the layers, n_position beyond n_video ...) fail before any work. For a weights
    file whose architecture is not given (model.backbone_arch), ks is checked against its depth right
    after the backbone is read (the same ConfigError)."""
    arch = cfg.model.backbone_arch
    if arch is None and is_arch(cfg.model.backbone) and not os.path.exists(cfg.model.backbone):
        arch = cfg.model.backbone
    options = dict(cfg.model.options)
    if arch is None:  # a weights file: check what does not depend on its depth on any architecture
        arch = "tiny"
        options.pop("ks", None)
    from vop.backbone.clip import CLIP

    with torch.device("meta"):
        create_model(cfg.model.method, CLIP(get_arch(arch)), frames=cfg.model.frames, **options)


def _dataset(cfg: RunConfig, split: str, size: int, train: bool) -> VideoTextDataset:
    ds = get_dataset(cfg.data.dataset, cfg.data.root, split, frames=cfg.model.frames, size=size, train=train,
                     seed=cfg.seed, videos_dir=cfg.data.videos_dir)
    if len(ds) == 0:
        raise DataError(f"the {split!r} split of {cfg.data.dataset} at {cfg.data.root} has no usable samples")
    return ds


def build_datasets(cfg: RunConfig, size: int) -> Datasets:
    train = _dataset(cfg, cfg.data.train_split, size, True)
    if cfg.data.val_split:
        return Datasets(train, _dataset(cfg, cfg.data.val_split, size, False), f"the {cfg.data.val_split!r} split")
    if cfg.data.val_fraction > 0:
        videos = list(train.videos)
        rng = np.random.default_rng(cfg.seed)
        held = set(rng.permutation(videos)[: max(1, round(cfg.data.val_fraction * len(videos)))].tolist())
        keep = [r for r in train.records if r.video_id not in held]
        val = [r for r in train.records if r.video_id in held]
        f = dict(frames=cfg.model.frames, size=size, name=train.name)
        note = f"{len(held)} training videos held out ({cfg.data.val_fraction:.0%}; the dataset has no validation split)"
        kept = VideoTextDataset(keep, train=True, seed=cfg.seed, split="train-minus-val", **f)
        # what the split lost (missing files...) still counts against data.max_skipped
        kept.dropped, kept.dropped_kinds = dict(train.dropped), dict(train.dropped_kinds)
        kept.dropped_samples, kept.dropped_samples_by_kind = train.dropped_samples, dict(train.dropped_samples_by_kind)
        return Datasets(kept, VideoTextDataset(val, train=False, split="val-from-train", **f), note)
    return Datasets(train, None, "none (the last epoch is reported)")


def selection_score(metrics: dict[str, Any], key: str) -> float:
    if key == "rsum":
        return sum(metrics["t2v"][k] for k in ("R1", "R5", "R10"))
    direction, name = key.split(".", 1)
    value = metrics[direction][name]
    return -value if name in ("MdR", "MnR") else value


# ----------------------------------------------------------------------------------------------
# resumable state
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_state_path(path: Path) -> Path:
    """Where the state before the current one is kept (``state.prev.pt``)."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_state(path: Path, **state: Any) -> None:
    """Write the new state completely, then keep the current one as ``state.prev.pt`` and switch.

    Every step is a rename (atomic): a kill never leaves a half-written ``state.pt``, and if the current
    file is damaged later (disk, copy), the previous good state is still there to resume from.
    """
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    if path.exists():
        prev = previous_state_path(path)
        prev_tmp = prev.with_name(prev.name + ".tmp")
        prev_tmp.unlink(missing_ok=True)
        try:
            os.link(path, prev_tmp)  # a second name for the current state: state.pt never disappears
        except OSError:  # a file system without hard links
            shutil.copy2(path, prev_tmp)
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read ``state.pt`` (tensors and plain data only: ``weights_only``); a damaged or foreign file is a
    CheckpointError that names it and says how to go on."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"trainable", "epoch", "batch", "step", "rng"} <= set(state):
            raise ValueError("not a vop training state")
        return state
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), OSError, ...
        first = (str(e).splitlines() or ["no detail"])[0].split(". ")[0]  # torch's long advice is not for this file
        reason = "an empty file" if path.stat().st_size == 0 else f"{type(e).__name__}: {first}"[:200]
    prev = previous_state_path(path)
    hint = "start the run again in a new out_dir"
    if prev.exists():
        try:
            p = torch.load(prev, map_location="cpu", weights_only=True)
            hint = (f"the previous state ({prev.name}, epoch {p['epoch']}, step {p['step']}) is intact: "
                    f"replace the damaged file with it (mv {prev} {path}) and resume again, or {hint}")
        except Exception:
            hint = f"the previous state {prev.name} is damaged too: {hint}"
    raise CheckpointError(f"{path}: the resumable training state is damaged or unreadable ({reason}); {hint}")


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def train(cfg: RunConfig | None = None, *, resume: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` (or resume the run in ``resume``); returns the results dict (also in results.json)."""
    saved_state: dict[str, Any] | None = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); nothing to resume")
        cfg = load_config(RunConfig, run_dir / "config.yaml")
        # read before any work: a damaged state fails here, not after the backbone and data are loaded
        saved_state = load_state(run_dir / "state.pt") if (run_dir / "state.pt").exists() else None
        prev = previous_state_path(run_dir / "state.pt")
        if saved_state is None and prev.exists():
            raise CheckpointError(f"{run_dir / 'state.pt'}: missing, but {prev.name} is there: rename it to state.pt "
                                  f"to resume from it (mv {prev} {run_dir / 'state.pt'}), or start a new run")
    elif cfg is None:
        raise ConfigError("give a configuration or a run directory to resume")
    else:
        run_dir = Path(cfg.out_dir)
        if (run_dir / "state.pt").exists():
            raise ConfigError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or set out_dir")
    env = DistEnv.from_env()
    check_config(cfg, env.world_size)
    device = env.device(cfg.device)
    env.setup(device)
    main = env.is_main

    torch.manual_seed(cfg.seed)
    clip = resolve_backbone(cfg.model.backbone, arch=cfg.model.backbone_arch)
    size = cfg.model.image_size or clip.cfg.vision.image_size
    data = build_datasets(cfg, size)
    test = _dataset(cfg, cfg.data.test_split, size, False)
    model = create_model(cfg.model.method, clip, frames=cfg.model.frames, **cfg.model.options).to(device)
    model.set_grad_checkpointing(cfg.optim.grad_checkpointing)
    trainable = model.trainable_parameters()

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "versions.json").write_text(json.dumps({
            "vop": __import__("vop").__version__, "torch": torch.__version__, "python": platform.python_version(),
            "world_size": env.world_size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        }, indent=2))
    writer = _tensorboard(run_dir) if main else None
    metrics_file = open(run_dir / "metrics.jsonl", "a") if main else None

    def record(entry: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    o = cfg.optim
    per_rank = o.batch_size // env.world_size
    loader = build_loader(data.train, per_rank, shuffle=True, num_workers=cfg.data.num_workers, seed=cfg.seed,
                          drop_last=True, rank=env.rank, world_size=env.world_size)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0 and trainable and o.epochs:
        raise DataError(f"the training split has {len(data.train)} samples, fewer than one batch of {o.batch_size}")
    skips = SkipTracker(data.train, loader, cfg.data.max_skipped, per_rank=per_rank, world_size=env.world_size,
                        hint=f"vop data verify --dataset {cfg.data.dataset} --root {cfg.data.root} --split {cfg.data.train_split}")
    skips.check_before()  # missing files alone over data.max_skipped: fail before training
    total_steps = max(1, steps_per_epoch * o.epochs)
    optimizer = torch.optim.AdamW(param_groups(model, o.lr, o.backbone_lr, o.weight_decay), betas=(0.9, 0.98), eps=1e-6) if trainable else None
    scheduler = cosine_with_warmup(optimizer, total_steps, round(o.warmup_fraction * total_steps)) if optimizer else None
    amp_dtype = autocast_dtype(device, o.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net: nn.Module = _Pair(model)
    if env.enabled and trainable:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    tokenizer = model.tokenizer(max_words=cfg.data.max_words)

    epoch, batch_in_epoch, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    state_path = run_dir / "state.pt"
    if resume is not None and saved_state is not None:
        state = saved_state
        try:
            with torch.no_grad():
                for n, p in model.named_trainable_parameters():
                    p.copy_(state["trainable"][n])
            if optimizer:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{state_path}: does not fit the model of {run_dir / 'config.yaml'} "
                                  f"({type(e).__name__}: {e}); was the config edited? Start a new run (new out_dir)") from None
        epoch, batch_in_epoch, step = state["epoch"], state["batch"], state["step"]
        history, best = state.get("history", []), state.get("best")
        skips.load_state_dict(state.get("skips"))
        if main:
            log.info("resumed %s at epoch %d, batch %d (step %d)", run_dir, epoch, batch_in_epoch, step)

    def checkpoint_state() -> None:
        if main and trainable:
            save_state(state_path, trainable={k: v.cpu() for k, v in model.trainable_state_dict().items()},
                       optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                       rng=_rng_state(), epoch=epoch, batch=batch_in_epoch, step=step, history=history, best=best,
                       skips=skips.state_dict(batch_in_epoch))

    def run_eval(ds: VideoTextDataset, split: str) -> dict[str, Any]:
        out = evaluate(model, ds, batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers,
                       max_words=cfg.data.max_words, precision=o.precision, postprocess=cfg.eval.postprocess,
                       dsl_temperature=cfg.eval.dsl_temperature, qb_k=cfg.eval.qb_k, qb_beta=cfg.eval.qb_beta,
                       querybank_captions=data.train.captions if cfg.eval.postprocess == "qbnorm" else None,
                       progress=progress)
        return out.metrics

    extra = {"backbone": cfg.model.backbone, "dataset": cfg.data.dataset}
    model.train()
    while trainable and epoch < o.epochs:
        loader.set_epoch(epoch, start_batch=batch_in_epoch)
        skips.start_epoch(batch_in_epoch)
        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{o.epochs}",
                   disable=not (main and progress), dynamic_ncols=True)
        t_last, seen = time.perf_counter(), 0
        for batch in loader:
            # each video's crop and flip depend only on (seed, epoch, its sample index), like its frames: the
            # same on any number of processes, micro-batches or workers, and after a resume
            draws = augment_draws(cfg.seed, epoch, batch["index"]) if cfg.data.augment else None
            video = to_model_input(batch["video"].to(device, non_blocking=True), train=cfg.data.augment, draws=draws)
            tokens = tokenizer(batch["text"]).to(device)
            loss = _step(net, model, video, tokens, o.accumulate, amp_dtype, device, scaler)
            if o.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            batch_in_epoch += 1
            seen += video.shape[0] * env.world_size
            loss = all_reduce_mean(loss, device)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if step % cfg.log_every == 0 or batch_in_epoch == steps_per_epoch:
                now = time.perf_counter()
                rate = seen / max(now - t_last, 1e-9)
                t_last, seen = now, 0
                record({"step": step, "epoch": epoch + batch_in_epoch / steps_per_epoch, "loss": loss, "lr": lr, "videos_per_s": rate})
                if writer:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/videos_per_s", rate, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint_state()
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                bar.close()
                os._exit(3)  # simulate a crash: no cleanup, no final checkpoint
        bar.close()
        epoch, batch_in_epoch = epoch + 1, 0
        entry: dict[str, Any] = {"epoch": epoch, "step": step}
        entry["skipped"] = skips.end_epoch(epoch, steps_per_epoch, device)  # logged; DataError over data.max_skipped
        if main:
            save_checkpoint(model, run_dir / "last.safetensors", extra={**extra, "epoch": epoch})
            if data.val is not None and (cfg.eval.every_epoch or epoch == o.epochs):
                entry["val"] = run_eval(data.val, "val")
                score = selection_score(entry["val"], o.select_metric)
                if best is None or score > best["score"]:
                    best = {"epoch": epoch, "score": score, "val": entry["val"]}
                    save_checkpoint(model, run_dir / "best.safetensors", extra={**extra, "epoch": epoch, "val": entry["val"]})
                if writer:
                    for d in ("t2v", "v2t"):
                        writer.add_scalar(f"val/{d}_R1", entry["val"][d]["R1"], epoch)
                record({"epoch": epoch, "split": "val", **entry["val"]})
        history.append(entry)
        checkpoint_state()
        env.barrier()

    results: dict[str, Any] = {}
    if main:
        last_test = run_eval(test, "test")
        results = {"method": cfg.model.method, "dataset": cfg.data.dataset, "epochs": o.epochs, "steps": step,
                   "trainable": model.parameter_counts()["trainable"], "validation": data.val_note,
                   "last": {"epoch": epoch, "test": last_test}, "history": history}
        if best is not None and (run_dir / "best.safetensors").exists():
            if best["epoch"] != epoch:
                load_trainable(model, run_dir / "best.safetensors")
                sel_test = run_eval(test, "test")
            else:
                sel_test = last_test
            results["selected"] = {"epoch": best["epoch"], "val": best["val"], "test": sel_test, "by": o.select_metric}
        record({"split": "test", "last": last_test, "selected": results.get("selected", {}).get("test")})
        results["skipped"] = skips.summary(history, test=last_test)
        if results["skipped"]["warn"]:
            log.warning("%s (listed in %s, 'skipped')", results["skipped"]["message"], run_dir / "results.json")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        if progress:
            print_summary(results)
    if metrics_file:
        metrics_file.close()
    if writer:
        writer.close()
    env.barrier()
    env.teardown()
    return results


def _step(net: nn.Module, model, video: torch.Tensor, tokens: torch.Tensor, chunks: int, amp_dtype, device: torch.device,
          scaler) -> float:
    """Forward + backward of one contrastive batch (split in ``chunks`` micro-batches, exactly)."""
    def embed(i: int):
        n = video.shape[0] // chunks
        sl = slice(i * n, (i + 1) * n) if chunks > 1 else slice(None)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return net(video[sl], tokens[sl])

    if chunks == 1:
        v, t = embed(0)
        loss = contrastive_loss(v, t, model.logit_scale)
        scaler.scale(loss).backward()
        return loss.item()
    return accumulated_backward(embed, chunks, lambda: model.logit_scale, getattr(net, "no_sync", None))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl has everything
        return None
    return SummaryWriter(str(run_dir / "tb"))


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['method']} on {results['dataset']}: test set (model selection: {results['validation']})")
    for col in ("model", "epoch", "t2v R@1", "R@5", "R@10", "MdR", "MnR", "v2t R@1", "R@5", "R@10", "MdR", "MnR"):
        table.add_column(col, justify="right" if col != "model" else "left")
    rows = [("last epoch", results["last"])]
    if "selected" in results:
        rows.append(("selected on val", results["selected"]))
    for name, r in rows:
        t, v = r["test"]["t2v"], r["test"]["v2t"]
        table.add_row(name, str(r["epoch"]), *(f"{t[k]:.1f}" for k in ("R1", "R5", "R10", "MdR", "MnR")),
                      *(f"{v[k]:.1f}" for k in ("R1", "R5", "R10", "MdR", "MnR")))
    console = Console(file=sys.stderr)
    console.print(table)
    test = results["last"]["test"]
    if test.get("partial"):
        console.print(f"test set {coverage_line(test)}: every number above is partial")
