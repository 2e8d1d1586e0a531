"""The demo: generate the synthetic world, evaluate zero-shot CLIP, adapt the methods with the same
training engine real datasets use, evaluate every one on the test split, write the report.

Every number comes from a run of this code; nothing is copied from the paper. Which method is which is
asked of the registry's facts (``vop.method_facts``), never of names: the reference row is the method that
trains nothing (``trains_nothing``), and the runs are typed ``RunConfig`` objects given to the engine.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import vop
from vop.data import generate_world, get_dataset, heldout_subset, temporal_subset
from vop.data.synth import GENERATOR, WORLD_ENTRIES, WORLD_SIZES, world_manifest
from vop.engine.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig
from vop.engine.evaluate import evaluate
from vop.engine.metrics import rank_metrics, t2v_ranks, tie_tolerance
from vop.engine.trainer import train
from vop.errors import ConfigError
from vop.methods import resolve_backbone

log = logging.getLogger("vop.demo")

#: the demo's default methods (the paper's Table 1 in miniature); the reference row, the method that trains
#: nothing (zero-shot CLIP), is added by the demo itself
HEADLINE = ["full", "vop", "vop-p", "vop-f", "vop-fc"]


@dataclass
class DemoSettings:
    backbone: str = "tiny-clip"
    world_size: str = "small"
    world_seed: int = 0
    frames: int = 8
    image_size: int = 64
    epochs: int = 5
    batch_size: int = 32
    num_workers: int = 2
    seeds: int = 1
    methods: list[str] = field(default_factory=lambda: list(HEADLINE))

    @classmethod
    def smoke(cls, **kw: Any) -> "DemoSettings":
        return cls(**{"world_size": "smoke", "epochs": 1, "batch_size": 8, "frames": 4, "num_workers": 0, **kw})


def diagnostics(out, dataset) -> dict[str, Any]:
    """Metrics on the temporal-order subset and on held-out compositions, from the test scores."""
    sim, gt = out.sim, dataset.text_to_video
    ranks, tied = t2v_ranks(sim, gt, ties=True)
    tol = tie_tolerance(sim)  # the metrics' tie rule: rounding-level differences are ties
    res: dict[str, Any] = {}
    temporal = temporal_subset(dataset)
    if len(temporal):
        res["temporal_R1"] = rank_metrics(ranks[temporal], tied=tied[temporal])["R1"]
        index = {v: i for i, v in enumerate(dataset.videos)}
        twins, kinds = dataset.meta_column("twin"), dataset.meta_column("temporal_kind")
        wins: dict[str, list[float]] = {"all": [], "reversed": [], "swapped": []}
        for i in temporal.tolist():
            j = index.get(twins[i])
            if j is None:
                continue
            own, other = sim[i, gt[i]].item(), sim[i, j].item()
            win = 1.0 if own > other + tol else 0.0 if other > own + tol else 0.5
            wins["all"].append(win)
            wins.setdefault(kinds[i], []).append(win)
        res["twin_accuracy"] = 100.0 * sum(wins["all"]) / max(1, len(wins["all"]))
        for kind in ("reversed", "swapped"):  # reversed twins hold the same frames: order-blind ~ 50% (ties)
            if wins[kind]:
                res[f"twin_accuracy_{kind}"] = 100.0 * sum(wins[kind]) / len(wins[kind])
        res["temporal_captions"] = len(temporal)
    held = heldout_subset(dataset)
    if len(held):
        res["heldout_R1"] = rank_metrics(ranks[held], tied=tied[held])["R1"]
        res["heldout_captions"] = len(held)
    return res


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of every metric."""
    out: dict[str, Any] = {}
    for d in ("t2v", "v2t"):
        out[d] = {k: _mean_std([r["test"][d][k] for r in runs]) for k in ("R1", "R5", "R10", "MdR", "MnR")}
    for k in ("temporal_R1", "twin_accuracy", "twin_accuracy_reversed", "twin_accuracy_swapped", "heldout_R1"):
        if k in runs[0]["diagnostics"]:
            out[k] = _mean_std([r["diagnostics"][k] for r in runs])
    return out


def output_folder(out_dir: str | Path) -> Path:
    """The demo's output folder, created if needed, checked writable by writing a file in it (permission
    bits say nothing for root or a read-only mount), before any work: a ``ConfigError`` naming it else."""
    out = Path(out_dir)
    for p in (out, *out.parents):  # a path at or below a regular file
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is" if p == out else f"lies below {p}, which is"
                kind = "a broken symbolic link" if not p.exists() else "a file, not a folder"
                raise ConfigError(f"cannot write the demo's output folder {out}: it {what} {kind}; "
                                  "give --out a writable folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in (out, out / "world", out / "runs"):
            if d.is_dir():
                with tempfile.NamedTemporaryFile(dir=d, prefix=".vop-write-check-"):
                    pass
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) != str(out) else ""
        raise ConfigError(f"cannot write the demo's output folder {out}{where}: {e.strerror or e}; "
                          "give --out a writable folder") from None
    return out


def world_problem(world: Path, s: DemoSettings) -> str | None:
    """Whether ``world`` holds the world ``s`` asks for: ``None`` (reuse it), or why it is to be written
    (again): ``""`` where there is none yet, else what the folder holds instead (size, seed, an older
    generator, an interrupted generation). ``ConfigError`` where the folder holds anything that
    :func:`vop.data.generate_world` did not write (it is never deleted)."""
    if s.world_size not in WORLD_SIZES:
        raise ConfigError(f"unknown world size {s.world_size!r}; choose one of {', '.join(WORLD_SIZES)}")
    refuse = (f"; the demo keeps its synthetic world in {world} and does not overwrite what it did not write: "
              f"use another --out, or delete {world}")
    if not world.exists() and not world.is_symlink():
        return ""
    if not world.is_dir():
        raise ConfigError(f"{world} is a file, not the demo's world folder{refuse}")
    entries = sorted(p.name for p in world.iterdir())
    if not entries:
        return ""
    meta = world_manifest(world)
    foreign = [e for e in entries if e not in WORLD_ENTRIES]
    if meta is None or foreign:
        listed = ", ".join((foreign or entries)[:5]) + (" ..." if len(foreign or entries) > 5 else "")
        why = "no world.json written by vop" if meta is None else "files vop's world generator does not write"
        raise ConfigError(f"{world} holds something not made by vop ({why}: {listed}){refuse}")
    old = f"size {meta.get('size')}, seed {meta.get('seed')}"
    if meta.get("incomplete"):
        return f"an incomplete world ({old}: its generation was interrupted)"
    if meta.get("generator") != GENERATOR:
        return f"a world of an older generator ({old})"
    if meta.get("seed") != s.world_seed or meta.get("spec") != asdict(WORLD_SIZES[s.world_size]):
        return f"the world of {old}"
    return None


def prepare(out: Path, s: DemoSettings, *, progress: bool = True, say: Callable[[str], None] = print):
    """The synthetic world (generated once per folder, again when the folder holds another world that
    vop wrote: another size, seed or generator; refused when it holds anything else), the backbone and
    the test split."""
    world = out / "world"
    problem = world_problem(world, s)  # before any work
    say(f"[1/4] synthetic world ({s.world_size}) -> {world}")
    if problem is not None:
        if problem:
            say(f"      {world} held {problem}, not the size {s.world_size}, seed {s.world_seed} world asked for: "
                "replaced by a new one")
            shutil.rmtree(world)
        generate_world(world, seed=s.world_seed, size=s.world_size, progress=progress)
    clip = resolve_backbone(s.backbone)
    test = get_dataset("collection", world, "test", frames=s.frames, size=s.image_size, train=False,
                       preprocess=clip.preprocess)
    say(f"      test split: {len(test.videos)} videos, {len(test.captions)} captions "
        f"({len(temporal_subset(test))} in the temporal-order subset)")
    return world, clip, test


def trains_nothing(method: str) -> bool:
    """The registry's fact: ``method`` has nothing to train (its run is an evaluation)."""
    return vop.method_facts(method).trains_nothing


def reference_method() -> str:
    """The demo's reference row: the first registered method that trains nothing (vop's zero-shot CLIP)."""
    for m in vop.list_methods():
        if trains_nothing(m):
            return m
    raise ConfigError("no registered method trains nothing: the demo's reference row (CLIP without tuning) needs one")


def evaluate_untrained(s: DemoSettings, clip, test, method: str | None = None, options: dict[str, Any] | None = None,
                       *, progress: bool = True):
    """A method that trains nothing (default: :func:`reference_method`, zero-shot CLIP with its frames
    mean-pooled) on the test split, as it is built: (run record, model, evaluation)."""
    model = vop.create_model(method or reference_method(), clip, frames=s.frames, **(options or {}))
    ev = evaluate(model, test, batch_size=32, num_workers=s.num_workers, progress=progress)
    run = {"seed": None, "test": {k: ev.metrics[k] for k in ("t2v", "v2t")}, "diagnostics": diagnostics(ev, test),
           "train_seconds": 0.0}
    return run, model, ev


def run_dir_name(method: str, options: dict[str, Any] | None, seed: int) -> str:
    """runs/<method>[_<option><value>...]-seed<seed>: the demo's names for runs without options."""
    opts = "".join(f"_{k}{v}" for k, v in sorted((options or {}).items()))
    return f"{method}{opts}-seed{seed}"


def train_and_evaluate(s: DemoSettings, out: Path, world: Path, clip, test, method: str, seed: int,
                       options: dict[str, Any] | None = None):
    """Train one (method, options, seed) with the training engine real datasets use (learning rates:
    the method's ``demo_rates``), reload the checkpoint selected on validation, evaluate it on test.

    Returns (run record, the reloaded model, its test evaluation).
    """
    run_dir = out / "runs" / run_dir_name(method, options, seed)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = run_config(s, world, method, seed, run_dir, options)
    t0 = time.perf_counter()
    summary = train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    ckpt = run_dir / ("best.safetensors" if (run_dir / "best.safetensors").exists() else "last.safetensors")
    model = vop.load_checkpoint(ckpt, clip)
    ev = evaluate(model, test, batch_size=32, num_workers=s.num_workers)
    run = {"seed": seed, "checkpoint": str(ckpt.relative_to(out)), "selected_epoch": summary.get("selected", {}).get("epoch"),
           "test": {k: ev.metrics[k] for k in ("t2v", "v2t")}, "diagnostics": diagnostics(ev, test),
           "train_seconds": seconds}
    return run, model, ev


def run_config(s: DemoSettings, world: Path, method: str, seed: int, run_dir: Path,
               options: dict[str, Any] | None = None) -> RunConfig:
    """The engine's run configuration of one demo training, built as the typed config (the engine checks
    it: types and ranges, the method's options). Learning rates: the method's ``demo_rates``, chosen on the
    world's validation split (docs/results.md), not its ``rates`` for real data."""
    rates = vop.method_facts(method).demo_rates
    return RunConfig(
        model=ModelConfig(method=method, backbone=s.backbone, frames=s.frames, image_size=s.image_size,
                          options=dict(options or {})),
        data=DataConfig(dataset="collection", root=str(world), num_workers=s.num_workers),
        optim=OptimConfig(epochs=s.epochs, batch_size=s.batch_size, lr=float(rates.lr),
                          backbone_lr=float(rates.backbone_lr), warmup_fraction=0.1),
        eval=EvalConfig(batch_size=32), seed=seed, out_dir=str(run_dir), log_every=20)


def check_methods(methods: list[str], clip, frames: int) -> None:
    """Build every method on the meta device (no memory) on the backbone's architecture, so that one that
    cannot be built (a broken plugin, an option out of range) stops the demo before any training."""
    from vop.methods import count_parameters

    for method in methods:
        count_parameters(method, clip.cfg, frames=frames)


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, *, progress: bool = True,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    s = settings or DemoSettings()
    out = output_folder(out_dir)
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    world, clip, test = prepare(out, s, progress=progress, say=say)
    check_methods(s.methods, clip, s.frames)
    results: dict[str, Any] = {"settings": asdict(s), "methods": {}}
    sims: dict[str, torch.Tensor] = {}  # seed-0 test scores, for the qualitative page
    # the methods that train nothing: the reference first, then any other asked for (evaluated, not trained)
    reference = reference_method()
    untrained = [reference] + [m for m in dict.fromkeys(s.methods) if m != reference and trains_nothing(m)]
    trained = [m for m in s.methods if not trains_nothing(m)]
    say("[2/4] zero-shot CLIP (frames mean-pooled)")
    for method in untrained:
        run, model, ev = evaluate_untrained(s, clip, test, method, progress=progress)
        sims[method] = ev.sim
        results["methods"][method] = {"counts": model.parameter_counts(), "runs": [run], "summary": aggregate([run])}
        _say_row(say, method, results["methods"][method]["summary"])

    say(f"[3/4] adapting {len(trained)} method(s) x {s.seeds} seed(s), {s.epochs} epoch(s) each")
    eta = Eta(trained, s.seeds)
    for method in trained:
        runs = []
        for seed in range(s.seeds):
            t0 = time.perf_counter()
            run, model, ev = train_and_evaluate(s, out, world, clip, test, method, seed)
            if seed == 0:
                sims[method] = ev.sim
            runs.append(run)
            counts = model.parameter_counts()
            eta.done(method, time.perf_counter() - t0)
        results["methods"][method] = {"counts": counts, "runs": runs, "summary": aggregate(runs)}
        _say_row(say, method, results["methods"][method]["summary"], runs)
        if eta.left:
            say(f"      {eta.report()}")

    results["machine"] = machine()
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["wall_seconds"] = time.perf_counter() - t_start
    results["peak_rss_mib"] = peak_rss_mib()
    say("[4/4] report")
    from vop.demo.report import write_report

    write_report(out, results, test, sims)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    say(f"done in {results['wall_seconds']:.0f} s (peak memory {results['peak_rss_mib']:.0f} MiB): "
        f"{out / 'results.md'}, {out / 'figure1.png'}, {out / 'qualitative.html'}")
    return results


class Eta:
    """Remaining time of the training phase from measured progress: a method's seeds take what its
    first seed took; methods not run yet take the mean of those measured so far."""

    def __init__(self, methods: list[str], seeds: int):
        self.todo = {m: seeds for m in methods}
        self.took: dict[str, list[float]] = {}

    def done(self, method: str, seconds: float) -> None:
        self.todo[method] -= 1
        self.took.setdefault(method, []).append(seconds)

    @property
    def left(self) -> int:
        return sum(self.todo.values())

    def remaining_seconds(self) -> float:
        measured = [t for ts in self.took.values() for t in ts]
        mean = statistics.fmean(measured) if measured else 0.0
        return sum(n * (statistics.fmean(self.took[m]) if m in self.took else mean) for m, n in self.todo.items())

    def report(self) -> str:
        total = sum(len(ts) for ts in self.took.values()) + self.left
        return (f"{total - self.left}/{total} trainings done; about {minutes(self.remaining_seconds())} left "
                "for the rest of this phase, then a few seconds for the report")


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _say_row(say: Callable[[str], None], method: str, summary: dict[str, Any], runs: list | None = None) -> None:
    t = summary["t2v"]
    extra = f"  temporal R@1 {summary['temporal_R1']['mean']:.1f}" if "temporal_R1" in summary else ""
    took = f"  ({sum(r['train_seconds'] for r in runs):.0f} s)" if runs else ""
    say(f"      {method:12s} t2v R@1 {t['R1']['mean']:5.1f}  R@5 {t['R5']['mean']:5.1f}  MnR {t['MnR']['mean']:5.1f}{extra}{took}")
