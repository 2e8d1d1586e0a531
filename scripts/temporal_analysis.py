"""The temporal analysis of a `vop demo` run, as reported in docs/results.md.

    python scripts/temporal_analysis.py demo-all            # seed-0 checkpoints of the run (~1 min)
    python scripts/temporal_analysis.py demo-out --ablate   # + the VoP^F ablations (~10 min, 2 cores)

Prints, for zero-shot and every method's seed-0 checkpoint in DIR/runs:
- test t2v R@1 and temporal-subset R@1 under the optimistic tie rule (ties never count against the
  ground truth) and under the project's rule (ties broken at random in expectation);
- how many reversed-twin captions score their video and its twin bit-identically, how many within
  the metrics' tie tolerance (`vop.engine.metrics.TIE_RTOL`), and the largest such score gap;
- the mean embedding distance (1 - cosine) of reversed twins, swapped twins and random pairs.
Then the size of VoP^F's trained frame position embedding against the tokens it is added to, and
how often a training batch holds a video of the same object with the inverse event. ``--ablate``
trains the VoP^F variants of the ablation table (seed 0, the demo's settings) and evaluates them.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import vop
from vop.data import get_dataset, temporal_subset
from vop.demo.run import diagnostics
from vop.engine.config import RunConfig, load_config
from vop.engine.evaluate import evaluate
from vop.engine.metrics import rank_metrics, t2v_ranks, tie_tolerance
from vop.engine.trainer import train
from vop.methods import resolve_backbone

INVERSE = {"move_left": "move_right", "move_right": "move_left", "move_up": "move_down", "move_down": "move_up",
           "grow": "shrink", "shrink": "grow", "appear": "disappear", "disappear": "appear"}
ABLATIONS = {  # name: (epochs, extra overrides)
    "ks = 2": (5, ["model.options.ks=2"]),
    "ks = 1": (5, ["model.options.ks=1"]),
    "10 epochs": (10, []),
    "frame position std 1.0": (5, ["model.options.frame_position_std=1.0"]),
}


def tie_and_distance_report(model, test, name: str) -> dict:
    ev = evaluate(model, test, batch_size=32)
    sim, gt = ev.sim, test.text_to_video
    ranks, tied = t2v_ranks(sim, gt, ties=True)
    temporal = temporal_subset(test)
    kinds, twins = test.meta_column("temporal_kind"), test.meta_column("twin")
    index = {v: i for i, v in enumerate(test.videos)}
    emb = ev.video_emb
    exact, within, largest, dist = 0, 0, 0.0, {"reversed": [], "swapped": []}
    tol = tie_tolerance(sim)
    for i in temporal.tolist():
        j = index[twins[i]]
        gap = abs(sim[i, gt[i]].item() - sim[i, j].item())
        exact += kinds[i] == "reversed" and gap == 0
        within += kinds[i] == "reversed" and gap <= tol
        if kinds[i] == "reversed":
            largest = max(largest, gap)
        dist[kinds[i]].append(1 - float(emb[gt[i]] @ emb[j]))
    gram = emb @ emb.t()
    n = gram.shape[0]
    row = {
        "method": name,
        "R1_optimistic": rank_metrics(ranks)["R1"], "R1": rank_metrics(ranks, tied=tied)["R1"],
        "temporal_R1_optimistic": rank_metrics(ranks[temporal])["R1"],
        "temporal_R1": rank_metrics(ranks[temporal], tied=tied[temporal])["R1"],
        "reversed_exact_ties": int(exact), "reversed_ties": int(within), "reversed_largest_gap": largest,
        "reversed_captions": len(dist["reversed"]),
        "distance_reversed": sum(dist["reversed"]) / len(dist["reversed"]),
        "distance_swapped": sum(dist["swapped"]) / len(dist["swapped"]),
        "distance_random": float((1 - gram).sum() / (n * n - n)),
    }
    print(f"{name:13s} R@1 {row['R1_optimistic']:5.1f} -> {row['R1']:5.1f}  temporal R@1 {row['temporal_R1_optimistic']:5.1f}"
          f" -> {row['temporal_R1']:5.1f}  ties {within:3d} (exact {exact:3d}, largest gap {largest:.1e})/{row['reversed_captions']}  distance reversed"
          f" {row['distance_reversed']:.4f} swapped {row['distance_swapped']:.4f} random {row['distance_random']:.4f}", flush=True)
    return row


def frame_position_scale(model, test) -> dict:
    """RMS of the trained frame position embedding vs the tokens entering the first joint layer."""
    vp = model.video_prompts
    seen = {}
    block = model.clip.visual.transformer.resblocks[vp.ks]
    hook = block.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0].detach()))
    batch = torch.stack([test.video_dataset()[i]["video"] for i in range(4)])
    with torch.no_grad():
        model.eval().encode_video(vop.data.to_model_input(batch))
    hook.remove()
    pos, x = vp.frame_position.detach().float(), seen["x"].float()
    res = {"position_rms": pos.pow(2).mean().sqrt().item(), "position_row_norm": pos.norm(dim=-1).mean().item(),
           "token_rms": x.pow(2).mean().sqrt().item(), "token_norm": x.norm(dim=-1).mean().item(), "layer": vp.ks + 1}
    print(f"VoP^F frame position: rms {res['position_rms']:.3f}, row norm {res['position_row_norm']:.2f}; tokens entering "
          f"layer {res['layer']}: rms {res['token_rms']:.2f}, norm {res['token_norm']:.1f}", flush=True)
    return res


def inverse_partner_rate(world: Path, batch: int) -> dict:
    """For training videos with one reversible event: P(a random batch holds the same object with the inverse event)."""
    events = {}
    for line in (world / "captions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            events[r["video"]] = r["events"]
    singles = [e for e in events.values() if ";" not in e]
    count = {e: singles.count(e) for e in set(singles)}
    n, probs = len(events), []
    for e in singles:
        obj, kind = e.rsplit(" ", 1)
        if kind in INVERSE:
            m = count.get(f"{obj} {INVERSE[kind]}", 0)
            probs.append(1 - (1 - m / (n - 1)) ** (batch - 1))
    res = {"videos": n, "reversible": len(probs), "p_partner": sum(probs) / len(probs) if probs else float("nan")}
    print(f"training batch of {batch}: {res['reversible']} of {n} videos have a reversible event; a same-object "
          f"inverse-event partner is in the batch {100 * res['p_partner']:.0f}% of the time", flush=True)
    return res


def ablate(out: Path, settings: dict, clip, test) -> list[dict]:
    rows = []
    for name, (epochs, extra) in ABLATIONS.items():
        run_dir = out / "ablations" / name.replace(" ", "_").replace("=", "")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        rates = vop.method_facts("vop-f").demo_rates
        lr, blr = rates.lr, rates.backbone_lr
        cfg = load_config(RunConfig, None, [
            f"data.root={out / 'world'}", "data.dataset=collection", f"model.backbone={settings['backbone']}",
            "model.method=vop-f", f"model.frames={settings['frames']}", f"model.image_size={settings['image_size']}",
            f"optim.epochs={epochs}", f"optim.batch_size={settings['batch_size']}", f"optim.lr={lr}",
            f"optim.backbone_lr={blr}", "optim.warmup_fraction=0.1", f"data.num_workers={settings['num_workers']}",
            "eval.batch_size=32", "seed=0", f"out_dir={run_dir}", "log_every=1000", *extra])
        train(cfg, progress=False)
        ckpt = run_dir / ("best.safetensors" if (run_dir / "best.safetensors").exists() else "last.safetensors")
        ev = evaluate(vop.load_checkpoint(ckpt, clip), test, batch_size=32)
        d, t, v = diagnostics(ev, test), ev.metrics["t2v"], ev.metrics["v2t"]
        rows.append({"variant": name, "t2v": t, "v2t": v, "diagnostics": d})
        print(f"VoP^F {name:24s} t2v R@1 {t['R1']:5.1f} R@5 {t['R5']:5.1f} MnR {t['MnR']:5.1f}  v2t R@1 {v['R1']:5.1f}  "
              f"temporal R@1 {d['temporal_R1']:5.1f}  reversed {d['twin_accuracy_reversed']:5.1f}  swapped "
              f"{d['twin_accuracy_swapped']:5.1f}  held-out R@1 {d['heldout_R1']:5.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo_dir", type=Path, help="output folder of `vop demo` (world/, runs/, results.json)")
    ap.add_argument("--ablate", action="store_true", help="also train and evaluate the VoP^F ablations")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)
    out = args.demo_dir
    if not (out / "results.json").is_file():
        raise SystemExit(f"{out / 'results.json'} not found: pass the --out folder of a finished `vop demo` run")
    settings = json.loads((out / "results.json").read_text())["settings"]
    clip = resolve_backbone(settings["backbone"])
    test = get_dataset("collection", out / "world", "test", frames=settings["frames"], size=settings["image_size"], train=False)
    report: dict = {"methods": []}
    for name in ["zeroshot", *settings["methods"]]:
        ckpt = out / "runs" / f"{name}-seed0" / "best.safetensors"
        if name == "zeroshot":
            model = vop.create_model("zeroshot", clip, frames=settings["frames"])
        elif ckpt.is_file():
            model = vop.load_checkpoint(ckpt, clip)
        else:
            print(f"{name}: no seed-0 checkpoint at {ckpt}, skipped")
            continue
        report["methods"].append(tie_and_distance_report(model, test, name))
        if name == "vop-f":
            report["frame_position"] = frame_position_scale(model, test)
    report["inverse_partner"] = inverse_partner_rate(out / "world", settings["batch_size"])
    if args.ablate:
        report["ablations"] = ablate(out, settings, clip, test)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
