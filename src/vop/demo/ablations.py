"""`vop demo --ablations`: the paper's ablation study on the demo's world and engine.

Four ablations of the paper (Sec. 4.3), each a table of rows; a row is a (method, options) run:

- (a) uni-modal prompts: zero-shot CLIP, text prompts only (``n_video=0``), video prompts only
  (``n_text=0``), both (basic VoP);
- (b) prompted depth: prompts in the first layer only, the first half of the layers, every layer, and
  the last half only (``prompt_from="output"``: where prompts help);
- (c) prompt length: 1, 2, 4, 8, 16 tokens per side (``n_text = n_video``);
- (d) VoP^F's K_s (frame-level layers before the joint video layers) over 0..layers.

Rows that are the same run (basic VoP with its defaults is "both", "every layer" and "8 tokens")
are trained once per seed: the distinct runs are computed first. Every run goes through
:func:`vop.demo.run.train_and_evaluate`, the demo's own training and evaluation (checkpoints
selected on validation, scored on test). Nothing here is tuned on the test split.

Outputs: ``ablations.json`` (every run and seed, metrics, parameter counts and shapes, train
seconds, machine, wall time), ``ablations.md`` (a table per ablation, each claim with a verdict),
``ablations.png`` (R@1 against the ablated quantity, trainable parameters on a second axis).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import vop
from vop.demo.run import (DemoSettings, Eta, minutes, aggregate, evaluate_untrained, machine, output_folder, peak_rss_mib,
                          prepare, reference_method, train_and_evaluate, trains_nothing)

LENGTHS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    x: Any = None  # the ablated quantity (a number, or a category name)

    @property
    def key(self) -> str:
        return run_key(self.method, dict(self.options))


@dataclass
class Ablation:
    name: str
    title: str
    x_label: str
    claim: str
    rows: list[Row]
    numeric: bool = True  # plot x as numbers (else as categories)
    log2: bool = False
    comparisons: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, row a, row b): see verdicts()


def run_key(method: str, options: dict[str, Any]) -> str:
    """A run's name: the method, then its non-default options (``vop[n_video=0]``)."""
    return method + ("[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]" if options else "")


def canonical(method: str, options: dict[str, Any], layers: int) -> tuple[tuple[str, Any], ...]:
    """Drop options at their default (or, for ``depth``, equal to every layer), so equal runs get equal keys."""
    defaults = asdict(vop.methods.get_method(method).Options())
    kept = {k: v for k, v in options.items() if not (v == defaults.get(k) or (k == "depth" and v is not None and v >= layers))}
    return tuple(sorted(kept.items()))


def ablations(layers: int) -> list[Ablation]:
    """The four ablations on a backbone with ``layers`` layers per tower (4 on the tiny CLIP, 12 on ViT-B)."""
    def row(label, method, x, **options):
        return Row(label, method, canonical(method, options, layers), x)

    half = max(1, layers // 2)
    ks_default = round(2 * layers / 3)
    untrained = reference_method()  # CLIP without tuning: the registered method that trains nothing
    depth_values = sorted({1, half, layers})
    return [
        Ablation(
            "modality", "(a) Uni-modal prompts", "prompted encoders",
            "prompting both encoders (VoP) > uni-modal prompts (text-only or video-only) > CLIP without tuning",
            [row("zero-shot CLIP (no prompts)", untrained, "none"), row("text prompts only", "vop", "text", n_video=0),
             row("video prompts only", "vop", "video", n_text=0), row("both (VoP)", "vop", "both")],
            numeric=False,
            comparisons=[("gt", "both (VoP)", "text prompts only"), ("gt", "both (VoP)", "video prompts only"),
                         ("gt", "text prompts only", "zero-shot CLIP (no prompts)"),
                         ("gt", "video prompts only", "zero-shot CLIP (no prompts)")]),
        Ablation(
            "depth", "(b) Prompted depth", "prompted layers (from the input)",
            "inserting prompts into every layer of both encoders gives the best results",
            [row(_depth_label(d, layers), "vop", d, depth=d) for d in depth_values]
            # where prompts help: the same number of prompted layers at the top instead of the bottom
            + [row(f"last {half} layers only", "vop", f"last {half}", depth=half, prompt_from="output")],
            comparisons=[("gt", _depth_label(layers, layers), _depth_label(d, layers)) for d in depth_values if d != layers]
            + [("gt", _depth_label(layers, layers), f"last {half} layers only"),
               ("gt", _depth_label(half, layers), f"last {half} layers only")]),
        Ablation(
            "length", "(c) Prompt length", "prompt tokens per side (n_text = n_video)",
            "only 8 prompt tokens per side remain competitive",
            [row(f"{n} token{'s' if n > 1 else ''}" + (" (default)" if n == 8 else ""), "vop", n, n_text=n, n_video=n)
             for n in LENGTHS],
            log2=True, comparisons=[("competitive", "8 tokens (default)", "")]),
        Ablation(
            "ks", "(d) VoP^F: frame-level layers K_s", "K_s (layers before the joint video layers)",
            f"the paper's K_s (2/3 of the depth: 8 of 12 layers on ViT-B/32, {ks_default} of {layers} here) "
            "is the best choice",
            [row(f"K_s = {k}" + (" (default)" if k == ks_default else ""), "vop-f", k, ks=k) for k in range(layers)]
            # K_s = every layer leaves no joint layer: VoP^F is then basic VoP, the same tensors in the same
            # creation order (tests/test_methods.py::test_vop_f_with_ks_equal_layers_is_vop) and the same
            # learning rates, so the basic VoP run is reused rather than trained again
            + [row(f"K_s = {layers} (= basic VoP)", "vop", layers)],
            comparisons=[("competitive", f"K_s = {ks_default} (default)", "")]),
    ]


def _depth_label(d: int, layers: int) -> str:
    if d >= layers:
        return f"every layer ({layers}, VoP)"
    return "first layer only" if d == 1 else f"first {d} layers" + (" (half)" if 2 * d == layers else "")


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def trainable_shapes(model) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def run_ablations(out_dir: str | Path, settings: DemoSettings | None = None, *, progress: bool = True,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    s = settings or DemoSettings(seeds=3)
    out = output_folder(out_dir)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    world, clip, test = prepare(out, s, progress=progress, say=say)
    layers = clip.tower_config("visual").layers
    if clip.tower_config("text").layers != layers:
        say(f"      note: text tower {clip.tower_config('text').layers} layers, image tower {layers}: depths follow the image tower")
    abls = ablations(layers)
    distinct: dict[str, Row] = {}
    for a in abls:
        for r in a.rows:
            distinct.setdefault(r.key, r)
    trained = [k for k, r in distinct.items() if not trains_nothing(r.method)]
    results: dict[str, Any] = {
        "settings": asdict(s), "layers": layers, "runs": {},
        "ablations": [{"name": a.name, "title": a.title, "x_label": a.x_label, "claim": a.claim,
                       "rows": [{"label": r.label, "x": r.x, "run": r.key} for r in a.rows]} for a in abls],
        "rows": sum(len(a.rows) for a in abls), "distinct_runs": len(distinct), "distinct_trainings": len(trained),
        "complete": False,
    }
    say(f"      {results['rows']} table rows, {len(distinct)} distinct runs: {', '.join(distinct)}")

    say("[2/4] zero-shot CLIP (frames mean-pooled)")
    for key, r in distinct.items():
        if trains_nothing(r.method):  # evaluated as it is, once
            run, model, _ = evaluate_untrained(s, clip, test, r.method, dict(r.options), progress=progress)
            results["runs"][key] = {"method": r.method, "options": dict(r.options), "counts": model.parameter_counts(),
                                    "shapes": trainable_shapes(model), "runs": [run], "summary": aggregate([run])}

    say(f"[3/4] {len(trained)} distinct trainings x {s.seeds} seed(s), {s.epochs} epoch(s) each "
        f"({len(trained) * s.seeds} trainings)")
    eta = Eta(trained, s.seeds)
    for seed in range(s.seeds):  # seed-major: a stopped run still has every row at the first seeds
        for key in trained:
            r = distinct[key]
            t0 = time.perf_counter()
            run, model, _ = train_and_evaluate(s, out, world, clip, test, r.method, seed, dict(r.options))
            entry = results["runs"].setdefault(key, {"method": r.method, "options": dict(r.options),
                                                     "counts": model.parameter_counts(), "shapes": trainable_shapes(model),
                                                     "runs": []})
            entry["runs"].append(run)
            entry["summary"] = aggregate(entry["runs"])
            eta.done(key, time.perf_counter() - t0)
            say(f"      seed {seed} {key:28s} t2v R@1 {run['test']['t2v']['R1']:5.1f}  ({run['train_seconds']:.0f} s train)"
                + (f"; {eta.report()}" if eta.left else ""))
            _stamp(results, t_start, load_start)
            (out / "ablations.json").write_text(json.dumps(results, indent=2))  # partial, rewritten after every run

    for a in results["ablations"]:
        a["verdicts"] = verdicts(a, results["runs"], next(x for x in abls if x.name == a["name"]).comparisons)
    results["complete"] = True
    _stamp(results, t_start, load_start)
    say("[4/4] report")
    from vop.demo.report import write_ablations

    write_ablations(out, results)
    (out / "ablations.json").write_text(json.dumps(results, indent=2))
    say(f"done in {minutes(results['wall_seconds'])} (peak memory {results['peak_rss_mib']:.0f} MiB): "
        f"{out / 'ablations.md'}, {out / 'ablations.png'}, {out / 'ablations.json'}")
    return results


def _stamp(results: dict[str, Any], t_start: float, load_start: tuple[float, float, float]) -> None:
    results["machine"] = machine()
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["wall_seconds"] = time.perf_counter() - t_start
    results["peak_rss_mib"] = peak_rss_mib()
    results["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}


# ------------------------------------------------------------------------------------------------
# verdicts: a measured margin against the seed spread
# ------------------------------------------------------------------------------------------------
def _r1(runs: dict[str, Any], key: str) -> tuple[float, float]:
    m = runs[key]["summary"]["t2v"]["R1"]
    return m["mean"], m["std"]


def verdicts(ablation: dict[str, Any], runs: dict[str, Any], comparisons: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Each comparison on t2v R@1 (mean over seeds). The seed spread of a difference is
    sqrt(std_a^2 + std_b^2), the standard deviation of the difference of two single-seed runs.

    ``gt`` (a > b): holds if the margin exceeds the spread, differs if b is ahead by more than the
    spread, else "within the seed spread". ``competitive`` (a within the spread of the best row):
    holds if best - a <= spread, else differs.
    """
    by_label = {r["label"]: r["run"] for r in ablation["rows"]}
    out = []
    for kind, a, b in comparisons:
        ma, sa = _r1(runs, by_label[a])
        if kind == "competitive":
            others = [r for r in ablation["rows"] if r["label"] != a]
            best = max(others, key=lambda r: _r1(runs, r["run"])[0])
            mb, sb = _r1(runs, best["run"])
            b = best["label"]
        else:
            mb, sb = _r1(runs, by_label[b])
        margin, spread = ma - mb, math.hypot(sa, sb)
        if kind == "gt":
            verdict = "holds" if margin > spread else "differs" if margin < -spread else "within the seed spread"
            text = f"{a} > {b}"
        else:
            verdict = "holds" if margin >= -spread else "differs"
            text = f"{a} competitive with the best other row ({b})"
        out.append({"kind": kind, "a": a, "b": b, "comparison": text, "a_R1": ma, "b_R1": mb, "margin": margin,
                    "spread": spread, "verdict": verdict})
    return out
