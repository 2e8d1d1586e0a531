"""The demo's report: results.md (the paper's table shape), figure1.png, qualitative.html.

What each part shows comes from the run (the methods it evaluated, in the order asked) and from the
methods' declared facts (``vop.method_facts``: the method that trains nothing is the reference row, the
whole-model one Figure 1's baseline), never from method names."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vop.data import load_frames, temporal_subset

def facts(method: str):
    """The method's declared facts (``MethodFacts``), or None for a name the registry does not hold (a results
    file of a plugin that is not installed)."""
    from vop.methods import list_methods, method_facts

    return method_facts(method) if method in list_methods() else None


def label(method: str) -> str:
    """The method's name in the paper's tables (its registered label)."""
    f = facts(method)
    return f.label if f is not None else method


def trains_nothing(method: str) -> bool:
    f = facts(method)
    return f is not None and f.trains_nothing


def qualitative_methods(methods: list[str]) -> list[str]:
    """The methods the qualitative page shows, from their facts and the order they were asked in: the reference
    (the first that trains nothing: CLIP without tuning), then the first and the last of the trained methods that
    keep CLIP frozen (prompts, adapters: for the demo's defaults basic VoP and VoP^{F+C}); where no trained method
    keeps CLIP frozen, the first trained one."""
    untrained = [m for m in methods if trains_nothing(m)][:1]
    trained = [m for m in methods if not trains_nothing(m)]
    frozen = [m for m in trained if facts(m) is not None and not facts(m).trains_backbone] or trained[:1]
    return untrained + list(dict.fromkeys(frozen[:1] + frozen[-1:])) or list(methods)[:2]


def _fmt(m: dict[str, float], digits: int = 1) -> str:
    return f"{m['mean']:.{digits}f}" + (f" ± {m['std']:.{digits}f}" if m["std"] else "")


def percent(counts: dict[str, int]) -> float:
    return 100.0 * counts["trainable"] / counts["backbone"]


def table_md(results: dict[str, Any]) -> str:
    seeds = results["settings"]["seeds"]
    lines = [
        "| method | trainable | % | t2v R@1 | R@5 | R@10 | MdR | MnR | v2t R@1 | R@5 | R@10 | MdR | MnR | temporal R@1 | twin acc. | held-out R@1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in results["methods"].items():
        s, c = r["summary"], r["counts"]
        cells = [label(method), f"{c['trainable']:,}", f"{percent(c):.3f}"]
        for d in ("t2v", "v2t"):
            cells += [_fmt(s[d][k]) for k in ("R1", "R5", "R10", "MdR", "MnR")]
        cells += [_fmt(s[k]) if k in s else "-" for k in ("temporal_R1", "twin_accuracy", "heldout_R1")]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Mean ± standard deviation over {seeds} training seeds." if seeds > 1 else "One training seed.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def twin_table_md(results: dict[str, Any]) -> str:
    """Twin accuracy split by kind: a reversed twin holds the same frames, so frame averaging is a
    coin flip there; a swapped twin differs in which event comes first."""
    lines = ["| method | reversed twins | swapped twins | all twins | temporal R@1 |",
             "| --- | ---: | ---: | ---: | ---: |"]
    keys = ("twin_accuracy_reversed", "twin_accuracy_swapped", "twin_accuracy", "temporal_R1")
    for method, r in results["methods"].items():
        s = r["summary"]
        if not any(k in s for k in keys):
            continue
        lines.append("| " + " | ".join([label(method)] + [_fmt(s[k]) if k in s else "-" for k in keys]) + " |")
    return "\n".join(lines) + "\n"


def write_figure(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    # the reference: full fine-tuning (the method that trains every CLIP weight)
    full = [m for m in methods if facts(m) is not None and facts(m).whole_model]
    if not full:
        return
    base = methods[full[0]]["summary"]["t2v"]["R1"]["mean"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    placed: list[tuple[float, float]] = []  # labelled points (x, gain)
    for name, r in methods.items():
        if name == full[0] or r["counts"]["trainable"] == 0:  # the reference itself, and zero-shot
            continue
        x = max(percent(r["counts"]), 1e-3)
        gain = r["summary"]["t2v"]["R1"]["mean"] - base
        err = r["summary"]["t2v"]["R1"]["std"]
        colour = "tab:red" if label(name).startswith("VoP") else "tab:blue"
        ax.errorbar([x], [gain], yerr=[err] if err else None, fmt="o", color=colour, capsize=3)
        # a label near an earlier one moves a line up (its point is higher) or down (lower)
        near = [pg for px, pg in placed if abs(math.log10(x / px)) < 0.08 and abs(gain - pg) < 0.8]
        placed.append((x, gain))
        dy = 4 + 9 * sum(1 if gain > pg else -1 for pg in near)
        ax.annotate(label(name), (x, gain), textcoords="offset points", xytext=(5, dy), fontsize=8)
    ax.axhline(0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the backbone, log scale)")
    ax.set_ylabel("t2v R@1 gain over full fine-tuning (points)")
    ax.set_title("Synthetic world: R@1 gain vs. trainable parameters (cf. paper Fig. 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _strip(path: Path, frames: int) -> np.ndarray:
    x, _ = load_frames(path, frames)  # uint8 (F, H, W, 3), test sampling: the frames the model saw
    pad = np.full((x.shape[1], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([np.concatenate([f, pad], axis=1) for f in x], axis=1)


def write_qualitative(out: Path, dataset, sims: dict[str, torch.Tensor], frames: int, queries: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir = out / "qualitative"
    img_dir.mkdir(exist_ok=True)
    shown = qualitative_methods(list(sims))
    temporal = temporal_subset(dataset).tolist()
    others = [i for i in range(len(dataset.captions)) if i not in set(temporal)]
    picks = temporal[: max(1, queries // 2) * 2: 2][: queries - 1] + others[:1]
    strips: dict[int, str] = {}

    def strip(v: int) -> str:
        if v not in strips:
            name = f"v{v:04d}.png"
            plt.imsave(img_dir / name, _strip(Path(dataset.video_paths[v]), frames))
            strips[v] = f"qualitative/{name}"
        return strips[v]

    gt = dataset.text_to_video
    parts = ["<!doctype html><meta charset='utf-8'><title>vop demo: qualitative results</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}img{height:48px;display:block}"
             ".hit{outline:3px solid #1a9641}.row{display:flex;gap:8px;align-items:center;margin:3px 0}"
             ".rank{width:2em;text-align:right;color:#666}.score{width:4em;color:#666;font-size:12px}"
             "h3{margin-bottom:4px}.method{font-weight:bold;margin-top:8px}</style>",
             "<h1>Top-5 retrieved videos</h1><p>Frames left to right in time. The correct video has a green "
             "outline. Temporal-order queries have a time-reversed or event-swapped twin in the gallery.</p>"]
    for q in picks:
        parts.append(f"<h3>“{html.escape(dataset.captions[q])}”{' (temporal-order subset)' if q in temporal else ''}</h3>")
        for m in shown:
            scores = sims[m][q]
            top = torch.topk(scores, min(5, scores.numel())).indices.tolist()
            parts.append(f"<div class='method'>{html.escape(m)}</div>")
            for rank, v in enumerate(top, 1):
                cls = " class='hit'" if v == int(gt[q]) else ""
                parts.append(f"<div class='row'><span class='rank'>{rank}</span><span class='score'>{scores[v]:.3f}</span>"
                             f"<img{cls} src='{strip(v)}' alt='{html.escape(dataset.videos[v])}' title='{html.escape(dataset.videos[v])}'></div>")
    (out / "qualitative.html").write_text("\n".join(parts), encoding="utf-8")


def write_report(out: Path, results: dict[str, Any], dataset, sims: dict[str, torch.Tensor]) -> None:
    s = results["settings"]
    md = [
        "# vop demo: synthetic world results",
        "",
        f"Backbone `{s['backbone']}`, world `{s['world_size']}` (seed {s['world_seed']}), {s['frames']} frames at "
        f"{s['image_size']} px, {s['epochs']} epochs, batch {s['batch_size']}; test split: "
        f"{len(dataset.videos)} videos, {len(dataset.captions)} captions. Checkpoints selected on the validation split.",
        f"Run on {results['date']} ({results['machine']['cpus']} CPUs, torch {results['machine']['torch']}): "
        f"{results['wall_seconds']:.0f} s, peak memory {results['peak_rss_mib']:.0f} MiB.",
        "",
        table_md(results),
        "temporal R@1: t2v R@1 over captions whose gallery contains their time-reversed or event-swapped twin. "
        "twin acc.: how often the caption scores its own video above its twin (chance 50%). held-out R@1: "
        "captions of attribute-event compositions never seen in training. Scores within the metrics' "
        "tie tolerance (1e-6 x the largest |score|) count as ties, broken at random in expectation.",
        "",
        "Twin accuracy by kind (a reversed twin holds the same frames: chance for frame averaging):",
        "",
        twin_table_md(results),
        "![R@1 gain over full fine-tuning](figure1.png)",
        "",
        "Qualitative results: [qualitative.html](qualitative.html)",
    ]
    write_figure(out / "figure1.png", results)
    write_qualitative(out, dataset, sims, s["frames"])
    (out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# `vop demo --ablations`: ablations.md, ablations.png
# ------------------------------------------------------------------------------------------------
def ablation_table_md(ablation: dict[str, Any], runs: dict[str, Any]) -> str:
    lines = ["| setting | run | trainable | t2v R@1 | R@5 | R@10 | MnR | v2t R@1 | temporal R@1 | held-out R@1 | train s / seed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in ablation["rows"]:
        r = runs[row["run"]]
        s = r["summary"]
        cells = [row["label"], f"`{row['run']}`", f"{r['counts']['trainable']:,}"]
        cells += [_fmt(s["t2v"][k]) for k in ("R1", "R5", "R10", "MnR")] + [_fmt(s["v2t"]["R1"])]
        cells += [_fmt(s[k]) if k in s else "-" for k in ("temporal_R1", "heldout_R1")]
        secs = [x["train_seconds"] for x in r["runs"]]
        cells.append(f"{sum(secs) / len(secs):.0f}" if any(secs) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts_md(ablation: dict[str, Any]) -> str:
    lines = []
    for v in ablation.get("verdicts", []):
        lines.append(f"- {v['comparison']}: {v['a_R1']:.1f} vs {v['b_R1']:.1f}, margin {v['margin']:+.1f} "
                     f"against a seed spread of {v['spread']:.1f}: **{v['verdict']}**")
    return "\n".join(lines) + ("\n" if lines else "")


def ablations_md(results: dict[str, Any]) -> str:
    s = results["settings"]
    seeds = s["seeds"]
    m = results["machine"]
    load = results.get("load_average", {})
    md = [
        "# vop demo --ablations: the paper's ablation study on the synthetic world",
        "",
        f"Backbone `{s['backbone']}` ({results['layers']} layers per tower), world `{s['world_size']}` (seed "
        f"{s['world_seed']}), {s['frames']} frames at {s['image_size']} px, {s['epochs']} epochs, batch {s['batch_size']}; "
        f"{seeds} training seed(s) per run; checkpoints selected on the validation split, scores on test. "
        f"{results['rows']} table rows from {results['distinct_runs']} distinct runs "
        f"({results['distinct_trainings']} trainings per seed; rows with the same method and options share one run).",
        f"Run on {results['date']} ({m['cpus']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}"
        + (f", {m['cuda']}" if m.get("cuda") else "") + f"): {results['wall_seconds']:.0f} s, peak memory "
        f"{results['peak_rss_mib']:.0f} MiB"
        + (f"; load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end" if load else "") + ".",
        "",
        (f"Mean ± standard deviation over {seeds} seeds. " if seeds > 1 else "One seed (no spread: verdicts are not findings). ")
        + "Verdicts compare t2v R@1 means; the seed spread of a difference is sqrt(std_a² + std_b²), the "
        "standard deviation of the difference of two single-seed runs; a margin inside it is not a finding.",
        "",
    ]
    for a in results["ablations"]:
        md += [f"## {a['title']}", "", f"Paper: {a['claim']}.", "", ablation_table_md(a, results["runs"]), verdicts_md(a)]
    md += ["![R@1 against the ablated quantity](ablations.png)", ""]
    return "\n".join(md)


def write_ablation_figure(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, abls = results["runs"], results["ablations"]
    zs = next((r for r in runs.values() if trains_nothing(r["method"])), None)  # CLIP without tuning
    cols = 2
    rows_n = (len(abls) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(10, 3.6 * rows_n), dpi=110, squeeze=False)
    for ax, a in zip(axes.flat, abls):
        rows = a["rows"]
        numeric = all(isinstance(r["x"], (int, float)) for r in rows)
        xs = [r["x"] if numeric else i for i, r in enumerate(rows)]
        mean = [runs[r["run"]]["summary"]["t2v"]["R1"]["mean"] for r in rows]
        std = [runs[r["run"]]["summary"]["t2v"]["R1"]["std"] for r in rows]
        ax.errorbar(xs, mean, yerr=std, fmt="o-", color="tab:red", capsize=3, label="t2v R@1 (mean ± std)")
        if zs is not None and all(not trains_nothing(runs[r["run"]]["method"]) for r in rows):
            ax.axhline(zs["summary"]["t2v"]["R1"]["mean"], color="grey", ls="--", lw=1, label="zero-shot")
        if numeric and any(isinstance(r["x"], int) and r["x"] > 0 for r in rows) and a["name"] == "length":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(r["x"]) for r in rows], fontsize=8)
        ax.set_xlabel(a["x_label"], fontsize=8)
        ax.set_ylabel("t2v R@1", fontsize=8)
        ax.set_title(a["title"], fontsize=9)
        params = [runs[r["run"]]["counts"]["trainable"] for r in rows]
        if len(set(params)) > 1:
            ax2 = ax.twinx()
            ax2.plot(xs, params, "s:", color="tab:blue", alpha=0.7, label="trainable parameters")
            ax2.set_ylabel("trainable parameters", fontsize=8, color="tab:blue")
            ax2.tick_params(axis="y", labelsize=7, colors="tab:blue")
            ax2.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(abls):]:
        ax.axis("off")
    seeds = results["settings"]["seeds"]
    fig.suptitle(f"Ablations on the synthetic world ({seeds} seed{'s' if seeds > 1 else ''}; cf. the paper's Sec. 4.3)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_ablations(out: Path, results: dict[str, Any]) -> None:
    (out / "ablations.md").write_text(ablations_md(results), encoding="utf-8")
    write_ablation_figure(out / "ablations.png", results)
