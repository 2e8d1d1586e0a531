"""The training loop: one function, `train(cfg)`, the same on one CPU and under torchrun.

Run directory (``cfg.out_dir``):
    config.yaml        the resolved configuration, learning rates filled in (``--resume`` reads it back)
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

from vop.backbone.config import arch_name, get_arch, is_arch
from vop.data import Preprocess, augment_draws, build_loader, get_dataset, to_model_input
from vop.data.dataset import VideoTextDataset
from vop.engine.config import RunConfig, check_ranges, load_config, save_config
from vop.engine.distributed import DistEnv, all_reduce_mean
from vop.engine.evaluate import autocast_dtype, coverage_line, evaluate
from vop.engine.loss import accumulated_backward, contrastive_loss
from vop.engine.optim import cosine_with_warmup, param_groups, resolve_rates
from vop.engine.skips import SkipTracker
from vop.errors import CheckpointError, ConfigError, DataError
from vop.methods import create_model, get_method, resolve_backbone
from vop.methods.base import private_backbone
from vop.methods.checkpoint import load_trainable, save_checkpoint
from vop.methods.registry import parse_options, plugin_errors

log = logging.getLogger("vop.train")


class _Pair(nn.Module):
    """What DDP wraps: forward returns the (video, text) features as the model's scoring scores them
    (normalised vectors for a dual encoder; cma's query score: raw frames (B, F, D) and text (B, D))."""

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
def check_config(cfg: RunConfig, world_size: int = 1, device: torch.device | None = None) -> None:
    """Every setting checked before any work: types and ranges, the method's options on the backbone's
    architecture (a meta-device build), and, with ``device`` and a backbone named by architecture, whether
    the model and its first training step fit that device's memory (:func:`check_step_memory`; for a
    weights file that is checked once its architecture is read)."""
    check_ranges(cfg)  # a config built in Python skips load_config's checks
    cls = get_method(cfg.model.method)
    with plugin_errors(cfg.model.method):  # a third-party method's own failure: a ConfigError naming its plugin
        parse_options(cfg.model.method, cls.Options, dict(cfg.model.options))
    o = cfg.optim
    if o.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} (the global contrastive batch) is not divisible by {world_size} processes")
    if (o.batch_size // world_size) % o.accumulate:
        raise ConfigError(f"the per-process batch {o.batch_size // world_size} is not divisible by optim.accumulate={o.accumulate}")
    if o.precision == "fp16" and o.accumulate > 1:
        raise ConfigError("optim.precision=fp16 with optim.accumulate > 1 is not supported: use bf16")
    if o.epochs < 0 or (o.lr is not None and o.lr <= 0):  # None: the method's declared rate (resolve_rates)
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
    model, exact = _check_model_options(cfg)
    if exact:
        check_image_size(cfg, model.clip.cfg)
    check_tokenizer(cfg, model.clip.cfg if exact else None)
    if device is not None and exact:
        check_step_memory(cfg, model, device, world_size)


def check_tokenizer(cfg: RunConfig, clip_cfg) -> None:
    """``model.tokenizer``: an existing file (or folder holding one), given for a backbone that reads its tokenizer
    from a file (SigLIP); such a backbone named by its architecture (random weights, no folder to find one in)
    needs it. ``clip_cfg``: the run's architecture, None for a weights file (checked when it is read)."""
    from vop.backbone.tokenizer import find_tokenizer_file, missing_tokenizer

    tok = cfg.model.tokenizer
    if tok is not None:
        if not (os.path.isfile(tok) or (os.path.isdir(tok) and find_tokenizer_file(os.path.join(tok, "x")))):
            raise ConfigError(f"model.tokenizer={tok}: no such tokenizer file (give the tokenizer.json of the weights' "
                              "folder, or a SentencePiece .model)")
        if clip_cfg is not None and clip_cfg.text.tokenizer == "clip":
            raise ConfigError(f"model.tokenizer={tok}: this backbone's text tower uses CLIP's BPE, which vop ships; "
                              "leave model.tokenizer out (it is for SigLIP / SigLIP2)")
    elif clip_cfg is not None and clip_cfg.text.tokenizer != "clip" and is_arch(cfg.model.backbone) \
            and not os.path.exists(cfg.model.backbone):
        raise ConfigError(f"model.tokenizer: {missing_tokenizer(clip_cfg)}")


def check_image_size(cfg: RunConfig, clip_cfg) -> None:
    """A tower with 2-D RoPE (PE-Core, EVA02) runs at its native resolution only (the references disagree on
    resizing its tables): ``model.image_size`` must be that or left out, a ConfigError otherwise."""
    v = clip_cfg.vision
    if v.rope and cfg.model.image_size not in (None, v.image_size):
        raise ConfigError(f"model.image_size={cfg.model.image_size}: this backbone's image tower (2-D RoPE, "
                          f"{clip_cfg.family}) runs at its native {v.image_size} px only; leave model.image_size out")


def check_step_memory(cfg: RunConfig, model, device: torch.device, world_size: int = 1, loaded: int = 0) -> None:
    """Refuse (ConfigError naming the settings to lower) a run whose model and first training step cannot
    fit ``device``'s free memory, from :func:`vop.memory.estimate_model_step` on ``model`` (built on the
    meta device with the run's method, options and frames); ``loaded``: bytes of it already in that
    memory (a backbone read from a file on the CPU). The estimate is a lower bound: only a run that
    certainly cannot fit is refused."""
    from vop.memory import check_fits, estimate_model_step, format_bytes

    o = cfg.optim
    size = cfg.model.image_size or model.clip.cfg.vision.image_size
    batch = max(1, o.batch_size // world_size // o.accumulate)
    amp = autocast_dtype(device, o.precision) is not None
    trains = bool(o.epochs) and any(p.requires_grad for p in model.parameters())
    est = estimate_model_step(model, batch=batch if trains else 0, frames=cfg.model.frames, image_size=size,
                              text_tokens=(model.max_text_tokens if model.clip.cfg.text.pool == "last"  # SigLIP: always its context
                                           else min(cfg.data.max_words, model.max_text_tokens)),
                              grad_checkpointing=o.grad_checkpointing, amp=amp)
    if not trains:
        est["total"] = est["weights"]
    # evaluation (every epoch and at the end) decodes eval.batch_size videos at a time
    evaluation = est["weights"] + 2 * 4 * cfg.eval.batch_size * cfg.model.frames * 3 * size * size
    needed = max(est["total"], evaluation) - loaded

    def hint() -> str:
        f, s = cfg.model.frames, size
        step = (f"the step: weights {format_bytes(est['weights'])}, optimiser state {format_bytes(est['optimizer'])}, "
                f"activations {format_bytes(est['activations'])} for {batch} videos x {f} frames x {est['video_tokens']} "
                f"image tokens, inputs {format_bytes(est['inputs'])}")
        if est["total"] < evaluation:
            return (f"evaluation decodes eval.batch_size={cfg.eval.batch_size} videos of {f} frames at {s} px at a time: "
                    "lower eval.batch_size, model.frames or model.image_size")
        if est["activations"] + est["inputs"] >= est["weights"] + est["optimizer"]:
            return (f"{step}; lower optim.batch_size ({o.batch_size}; or raise optim.accumulate, {o.accumulate}), "
                    f"model.frames ({f}) or model.image_size ({s}), or set optim.grad_checkpointing=true")
        from vop.methods import large_options

        culprits = large_options(type(model), model.opts, model.clip.cfg, cfg.model.frames)
        fix = ("lower " + ", ".join(culprits)) if culprits else "use a smaller backbone or smaller method options"
        return f"{step}; the model itself is too large: {fix}"

    what = f"training {cfg.model.method} on {arch_name(model.clip.cfg) or 'this backbone'}" if trains else \
        f"evaluating {cfg.model.method}"
    check_fits(needed, device, what, hint)


def _check_model_options(cfg: RunConfig) -> tuple[nn.Module, bool]:
    """Build the model on the meta device (no memory, no weights read), so that method options out of
    range (ks beyond the layers, n_position beyond n_video ...) fail before any work. For a weights
    file whose architecture is not given (model.backbone_arch), the method's ``depth_options`` (ks ...)
    are checked against its depth right after the backbone is read (the same ConfigError)."""
    arch = cfg.model.backbone_arch
    if arch is None and is_arch(cfg.model.backbone) and not os.path.exists(cfg.model.backbone):
        arch = cfg.model.backbone
    options = dict(cfg.model.options)
    exact = arch is not None  # the model built is the run's (not a stand-in for a weights file's architecture)
    if arch is None:  # a weights file: check what does not depend on its depth on any architecture
        arch = "tiny"
        for name in get_method(cfg.model.method).depth_options:
            options.pop(name, None)
    from vop.backbone.clip import CLIP

    with torch.device("meta"):
        model = create_model(cfg.model.method, CLIP(get_arch(arch)), frames=cfg.model.frames, **options)
    return model, exact


def _dataset(cfg: RunConfig, split: str, size: int, train: bool, preprocess: Preprocess | None = None
             ) -> VideoTextDataset:
    ds = get_dataset(cfg.data.dataset, cfg.data.root, split, frames=cfg.model.frames, size=size, train=train,
                     seed=cfg.seed, videos_dir=cfg.data.videos_dir, preprocess=preprocess)
    if len(ds) == 0:
        raise DataError(f"the {split!r} split of {cfg.data.dataset} at {cfg.data.root} has no usable samples")
    return ds


def build_datasets(cfg: RunConfig, size: int, preprocess: Preprocess | None = None) -> Datasets:
    """``preprocess``: the backbone's (``clip.preprocess``: how frames are resized; None: CLIP's)."""
    train = _dataset(cfg, cfg.data.train_split, size, True, preprocess)
    if cfg.data.val_split:
        return Datasets(train, _dataset(cfg, cfg.data.val_split, size, False, preprocess),
                        f"the {cfg.data.val_split!r} split")
    if cfg.data.val_fraction > 0:
        videos = list(train.videos)
        rng = np.random.default_rng(cfg.seed)
        held = set(rng.permutation(videos)[: max(1, round(cfg.data.val_fraction * len(videos)))].tolist())
        keep = [r for r in train.records if r.video_id not in held]
        val = [r for r in train.records if r.video_id in held]
        f = dict(frames=cfg.model.frames, size=size, name=train.name, preprocess=preprocess)
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
#: Test hook, not a setting: with ``VOP_TEST_STOP_AFTER_STEPS=N`` in the environment, the process ends
#: abruptly after optimiser step N (``os._exit(3)``: no cleanup, no final checkpoint), as a crash would.
#: tests/test_engine_train.py sets it in a subprocess to test resuming a killed run.
TEST_STOP_ENV = "VOP_TEST_STOP_AFTER_STEPS"


def _test_stop_after_steps() -> int | None:
    value = os.environ.get(TEST_STOP_ENV, "").strip()
    return int(value) if value else None


def train(cfg: RunConfig | None = None, *, resume: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` (or resume the run in ``resume``); returns the results dict (also in results.json).

    The phases, in order: open the run directory (and read a resumed run's state), fill in the learning
    rates left out (the method's declared ones, :func:`vop.engine.optim.resolve_rates`), check the config
    and join the processes, build data, model and optimiser (:class:`_Run`), restore the resumed
    state, train epoch by epoch (each epoch ends with validation and model selection), then test the
    last and the selected model and write the results.
    """
    cfg, run_dir, saved_state = _open_run(cfg, resume)
    cfg, rates = resolve_rates(cfg)  # optim.lr / backbone_lr left out: the method's declared rates (saved so)
    env = DistEnv.from_env()
    device = env.device(cfg.device)
    check_config(cfg, env.world_size, device)
    env.setup(device)
    run = _Run(cfg, run_dir, env, device, progress)
    if env.is_main:  # each value and where it comes from, once config, backbone and data are known good
        log.info(rates)  # (so that a user error stays the first and only line printed)
    if saved_state is not None:
        run.restore(saved_state)
    run.model.train()
    while run.trainable and run.epoch < cfg.optim.epochs:
        run.train_epoch()
        run.end_epoch()
    return run.finish()


def _open_run(cfg: RunConfig | None, resume: str | os.PathLike | None) -> tuple[RunConfig, Path, dict[str, Any] | None]:
    """The config, the run directory and (when resuming) the saved state, checked before any work."""
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
        return cfg, run_dir, saved_state
    if cfg is None:
        raise ConfigError("give a configuration or a run directory to resume")
    run_dir = Path(cfg.out_dir)
    if (run_dir / "state.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or set out_dir")
    return cfg, run_dir, None


class _Run:
    """One training run: what :func:`train` builds (in this order: model and data, the run files, the
    loader and optimiser) and where it stands (``epoch``, ``batch_in_epoch``, ``step``, ``history``,
    ``best``), which is what ``state.pt`` saves."""

    def __init__(self, cfg: RunConfig, run_dir: Path, env: DistEnv, device: torch.device, progress: bool):
        self.cfg, self.run_dir, self.env, self.device, self.progress = cfg, run_dir, env, device, progress
        self.main = env.is_main
        self.state_path = run_dir / "state.pt"
        self.extra = {"backbone": cfg.model.backbone, "dataset": cfg.data.dataset}  # recorded in checkpoints
        self._build_model_and_data()
        self._open_run_files()
        self._build_loader_and_optimiser()
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.stop_after = _test_stop_after_steps()

    # --- building ----------------------------------------------------------------------------------
    def _build_model_and_data(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        clip = resolve_backbone(cfg.model.backbone, arch=cfg.model.backbone_arch, tokenizer=cfg.model.tokenizer)
        if not (is_arch(cfg.model.backbone) and not os.path.exists(cfg.model.backbone)):
            # a weights file: its architecture is known now; the model and step checked before data and model
            from vop.backbone.clip import CLIP

            with torch.device("meta"):
                meta_model = create_model(cfg.model.method, CLIP(clip.cfg), frames=cfg.model.frames, **cfg.model.options)
            on_device = 4 * sum(p.numel() for p in clip.parameters()) if self.device.type == "cpu" else 0
            check_step_memory(cfg, meta_model, self.device, self.env.world_size, loaded=on_device)
        check_image_size(cfg, clip.cfg)
        size = cfg.model.image_size or clip.cfg.vision.image_size
        self.data = build_datasets(cfg, size, clip.preprocess)
        self.test = _dataset(cfg, cfg.data.test_split, size, False, clip.preprocess)
        # loaded for this run alone: the model trains it in place, no copy of what it trains (vop.methods.base)
        self.model = create_model(cfg.model.method, private_backbone(clip), frames=cfg.model.frames,
                                  **cfg.model.options).to(self.device)
        self.model.set_grad_checkpointing(cfg.optim.grad_checkpointing)
        self.trainable = self.model.trainable_parameters()

    def _open_run_files(self) -> None:
        """config.yaml and versions.json; the metrics log and TensorBoard writer (main process only)."""
        run_dir, device = self.run_dir, self.device
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
            (run_dir / "versions.json").write_text(json.dumps({
                "vop": __import__("vop").__version__, "torch": torch.__version__, "python": platform.python_version(),
                "world_size": self.env.world_size, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            }, indent=2))
        self.writer = _tensorboard(run_dir) if self.main else None
        self.metrics_file = open(run_dir / "metrics.jsonl", "a") if self.main else None

    def _build_loader_and_optimiser(self) -> None:
        cfg, o, env, model = self.cfg, self.cfg.optim, self.env, self.model
        per_rank = o.batch_size // env.world_size
        self.loader = build_loader(self.data.train, per_rank, shuffle=True, num_workers=cfg.data.num_workers,
                                   seed=cfg.seed, drop_last=True, rank=env.rank, world_size=env.world_size)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0 and self.trainable and o.epochs:
            raise DataError(f"the training split has {len(self.data.train)} samples, fewer than one batch of {o.batch_size}")
        self.skips = SkipTracker(self.data.train, self.loader, cfg.data.max_skipped, per_rank=per_rank,
                                 world_size=env.world_size, hint=f"vop data verify --dataset {cfg.data.dataset} "
                                 f"--root {cfg.data.root} --split {cfg.data.train_split}")
        self.skips.check_before()  # missing files alone over data.max_skipped: fail before training
        total_steps = max(1, self.steps_per_epoch * o.epochs)
        self.optimizer = torch.optim.AdamW(param_groups(model, o.lr, o.backbone_lr, o.weight_decay), betas=(0.9, 0.98),
                                           eps=1e-6) if self.trainable else None
        self.scheduler = cosine_with_warmup(self.optimizer, total_steps, round(o.warmup_fraction * total_steps)) \
            if self.optimizer else None
        self.amp_dtype = autocast_dtype(self.device, o.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.net: nn.Module = _Pair(model)
        if env.enabled and self.trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.tokenizer = model.tokenizer(max_words=cfg.data.max_words)

    # --- resumable state -----------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (read by :func:`load_state`) stopped."""
        try:
            with torch.no_grad():
                for n, p in self.model.named_trainable_parameters():
                    p.copy_(state["trainable"][n])
            if self.optimizer:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{self.state_path}: does not fit the model of {self.run_dir / 'config.yaml'} "
                                  f"({type(e).__name__}: {e}); was the config edited? Start a new run (new out_dir)") from None
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch"], state["step"]
        self.history, self.best = state.get("history", []), state.get("best")
        self.skips.load_state_dict(state.get("skips"))
        if self.main:
            log.info("resumed %s at epoch %d, batch %d (step %d)", self.run_dir, self.epoch, self.batch_in_epoch, self.step)

    def checkpoint(self) -> None:
        """Write ``state.pt`` (main process; a run that trains nothing has no state)."""
        if self.main and self.trainable:
            save_state(self.state_path, trainable={k: v.cpu() for k, v in self.model.trainable_state_dict().items()},
                       optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                       scaler=self.scaler.state_dict(), rng=_rng_state(), epoch=self.epoch, batch=self.batch_in_epoch,
                       step=self.step, history=self.history, best=self.best,
                       skips=self.skips.state_dict(self.batch_in_epoch))

    # --- training ------------------------------------------------------------------------------------
    def train_epoch(self) -> None:
        """The rest of the current epoch (all of it, unless resumed mid-epoch): steps, log lines, checkpoints."""
        cfg = self.cfg
        self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        self.skips.start_epoch(self.batch_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                   disable=not (self.main and self.progress), dynamic_ncols=True)
        t_last, seen = time.perf_counter(), 0
        for batch in self.loader:
            loss, videos = self._optimiser_step(batch)
            seen += videos * self.env.world_size
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                now = time.perf_counter()
                rate = seen / max(now - t_last, 1e-9)
                t_last, seen = now, 0
                self._log_step(loss, lr, rate)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if self.stop_after is not None and self.step >= self.stop_after:
                bar.close()
                os._exit(3)  # the test hook (TEST_STOP_ENV) simulates a crash: no cleanup, no final checkpoint
        bar.close()

    def _optimiser_step(self, batch: dict[str, Any]) -> tuple[float, int]:
        """One optimiser step on ``batch``: (the loss averaged over processes, this process's videos)."""
        cfg, o, device = self.cfg, self.cfg.optim, self.device
        # each video's crop and flip depend only on (seed, epoch, its sample index), like its frames: the
        # same on any number of processes, micro-batches or workers, and after a resume
        draws = augment_draws(cfg.seed, self.epoch, batch["index"]) if cfg.data.augment else None
        video = to_model_input(batch["video"].to(device, non_blocking=True), train=cfg.data.augment, draws=draws,
                               preprocess=self.model.clip.preprocess)
        tokens = self.tokenizer(batch["text"]).to(device)
        loss = _step(self.net, self.model, video, tokens, o.accumulate, self.amp_dtype, device, self.scaler)
        if o.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, o.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.model.clip.clamp_logit_scale()
        self.step += 1
        self.batch_in_epoch += 1
        return all_reduce_mean(loss, device), video.shape[0]

    def _log_step(self, loss: float, lr: float, rate: float) -> None:
        epoch = self.epoch + self.batch_in_epoch / self.steps_per_epoch
        self.record({"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "videos_per_s": rate})
        if self.writer:
            self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/videos_per_s", rate, self.step)

    # --- validation and model selection ------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Close the epoch: the bound on skipped samples, last.safetensors, validation and model selection
        (main process), then the resumable state."""
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        entry: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        # logged; a DataError when the epoch lost more than data.max_skipped
        entry["skipped"] = self.skips.end_epoch(self.epoch, self.steps_per_epoch, self.device)
        if self.main:
            save_checkpoint(self.model, self.run_dir / "last.safetensors", extra={**self.extra, "epoch": self.epoch})
            if self.data.val is not None and (self.cfg.eval.every_epoch or self.epoch == self.cfg.optim.epochs):
                entry["val"] = self._validate()
        self.history.append(entry)
        self.checkpoint()
        self.env.barrier()

    def _validate(self) -> dict[str, Any]:
        """Val metrics of this epoch's model; best.safetensors when it scores best so far (never on test)."""
        val = self.evaluate(self.data.val)
        score = selection_score(val, self.cfg.optim.select_metric)
        if self.best is None or score > self.best["score"]:
            self.best = {"epoch": self.epoch, "score": score, "val": val}
            save_checkpoint(self.model, self.run_dir / "best.safetensors",
                            extra={**self.extra, "epoch": self.epoch, "val": val})
        if self.writer:
            for d in ("t2v", "v2t"):
                self.writer.add_scalar(f"val/{d}_R1", val[d]["R1"], self.epoch)
        self.record({"epoch": self.epoch, "split": "val", **val})
        return val

    def evaluate(self, ds: VideoTextDataset) -> dict[str, Any]:
        cfg = self.cfg
        out = evaluate(self.model, ds, batch_size=cfg.eval.batch_size, device=self.device, num_workers=cfg.data.num_workers,
                       max_words=cfg.data.max_words, precision=cfg.optim.precision, postprocess=cfg.eval.postprocess,
                       dsl_temperature=cfg.eval.dsl_temperature, qb_k=cfg.eval.qb_k, qb_beta=cfg.eval.qb_beta,
                       querybank_captions=self.data.train.captions if cfg.eval.postprocess == "qbnorm" else None,
                       progress=self.progress)
        return out.metrics

    def record(self, entry: dict[str, Any]) -> None:
        """One line of metrics.jsonl (main process)."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(entry) + "\n")
            self.metrics_file.flush()

    # --- the end -----------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Test, write results.json (main process), close the files and leave the process group."""
        results = self._test_and_write_results() if self.main else {}
        if self.metrics_file:
            self.metrics_file.close()
        if self.writer:
            self.writer.close()
        self.env.barrier()
        self.env.teardown()
        return results

    def _test_and_write_results(self) -> dict[str, Any]:
        """Test metrics of the last and of the val-selected epoch, and what the run skipped."""
        cfg, run_dir, best = self.cfg, self.run_dir, self.best
        last_test = self.evaluate(self.test)
        results: dict[str, Any] = {
            "method": cfg.model.method, "dataset": cfg.data.dataset, "epochs": cfg.optim.epochs, "steps": self.step,
            "trainable": self.model.parameter_counts()["trainable"], "validation": self.data.val_note,
            "last": {"epoch": self.epoch, "test": last_test}, "history": self.history}
        if best is not None and (run_dir / "best.safetensors").exists():
            if best["epoch"] != self.epoch:
                load_trainable(self.model, run_dir / "best.safetensors")
                sel_test = self.evaluate(self.test)
            else:
                sel_test = last_test
            results["selected"] = {"epoch": best["epoch"], "val": best["val"], "test": sel_test, "by": cfg.optim.select_metric}
        self.record({"split": "test", "last": last_test, "selected": results.get("selected", {}).get("test")})
        results["skipped"] = self.skips.summary(self.history, test=last_test)
        if results["skipped"]["warn"]:
            log.warning("%s (listed in %s, 'skipped')", results["skipped"]["message"], run_dir / "results.json")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        if self.progress:
            print_summary(results)
        return results


def _step(net: nn.Module, model, video: torch.Tensor, tokens: torch.Tensor, chunks: int, amp_dtype, device: torch.device,
          scaler) -> float:
    """Forward + backward of one contrastive batch (split in ``chunks`` micro-batches, exactly), scored by
    the model's ``scoring`` over the (global) batch."""
    def embed(i: int):
        n = video.shape[0] // chunks
        sl = slice(i * n, (i + 1) * n) if chunks > 1 else slice(None)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return net(video[sl], tokens[sl])

    similarity = model.scoring
    if chunks == 1:
        v, t = embed(0)
        loss = contrastive_loss(v, t, model.logit_scale, similarity)
        scaler.scale(loss).backward()
        return loss.item()
    return accumulated_backward(embed, chunks, lambda: model.logit_scale, getattr(net, "no_sync", None), similarity)


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
