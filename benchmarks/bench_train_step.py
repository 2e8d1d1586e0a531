"""Training-step cost of each method relative to full fine-tuning, measured in one run.

A step = forward of B videos x F frames and B captions (32 tokens), symmetric InfoNCE, backward,
AdamW step. Each method runs in its own subprocess so that peak memory is its own; the subprocesses
are run in ``--rounds`` interleaved rounds (full, vop, ..., full, vop, ...) so that background load
hits every method alike, and the reported step time is the median of all timed steps of all rounds.
Times: CPU seconds of the method's process (``--clock cpu``, the default: robust to other jobs on a
shared machine) and wall time; one torch thread by default (``--threads``). Peak memory is the whole
cost of training: weights, gradients, optimiser state and activations.
- CUDA: torch.cuda.max_memory_allocated over the run (bf16 autocast);
- CPU: peak resident set size (getrusage) minus the resident size after importing torch and vop,
  before anything is built (float32).

    python benchmarks/bench_train_step.py            # every method, ViT-B/32, 2 x 12 frames, CPU (~20 min)
    python benchmarks/bench_train_step.py --methods full,vop,vop-f,vop-fc --rounds 3
    python benchmarks/bench_train_step.py --arch tiny --frames 4 --image-size 32 --no-doc --json /tmp/t.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(method: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import vop

    rss0 = _rss_bytes()
    torch.manual_seed(0)
    C.set_threads(args.threads)
    device = torch.device(args.device)
    clip = vop.build_clip(args.arch, seed=0)
    model = vop.create_model(method, clip, frames=args.frames).to(device).train()
    size = args.image_size or clip.cfg.vision.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=device)
    tokens = C.caption_tokens(args.batch, min(args.words, model.max_text_tokens)).to(device)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    labels = torch.arange(args.batch, device=device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            v, t = model(video, tokens)
            # a pairwise method (cma) scores raw frames with its own similarity
            logits = model.logit_scale * (model.similarity(t, v) if model.pairwise else t @ v.t())
            loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().t(), labels)) / 2
        if opt is not None:  # zeroshot trains nothing: its "step" is the forward pass
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    counts = model.parameter_counts()
    return {"method": method, "wall_s_all": times, "cpu_s_all": cpu, "peak_bytes": peak,
            "trainable": counts["trainable"], "threads": torch.get_num_threads(), "loadavg": C.loadavg()}


def markdown(results: list[dict], meta: dict) -> str:
    base = meta["baseline"]
    clock = "CPU time" if meta["clock"] == "cpu" else "wall time"
    lines = [f"Measured {C.describe(meta)}; {meta['arch']}, batch {meta['batch']} x {meta['frames']} frames at "
             f"{meta['image_size']} px, {meta['words']}-token captions, {meta['device']} float32; median of "
             f"{meta['rounds']} interleaved rounds x {meta['steps']} steps (after {meta['warmup']} warm-up step per "
             f"round); ratios of {clock}; peak memory = peak RSS growth of the method's own process. "
             f"`python benchmarks/bench_train_step.py`.", "",
             f"| method | trainable | step, CPU time (s) | step, wall (s) | time / {base} | peak memory (MiB) | memory / {base} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| `{r['method']}` | {r['trainable']:,} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['time_ratio']:.2f} | "
                     f"{C.mib(r['peak_bytes'])} | {r['memory_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/32")  # OpenAI's (QuickGELU), the paper's backbone
    p.add_argument("--methods", default="all", help="comma-separated, or all (default); full is the reference")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--words", type=int, default=32, help="caption tokens incl. [SOT]/[EOT] (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of subprocesses (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    C.add_timing_args(p)
    C.add_common_args(p, "train_step_vitb32_cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    import vop

    methods = vop.list_methods() if args.methods == "all" else args.methods.split(",")
    per: dict[str, list[dict]] = {m: [] for m in methods}
    meta = C.machine_meta(args.device, args.threads or None)
    if args.device != "cpu":
        args.clock = "wall"
    for rnd in range(args.rounds):
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", method, "--arch", args.arch,
                   "--batch", str(args.batch), "--frames", str(args.frames), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
                   "--words", str(args.words), "--clock", args.clock]
            if args.image_size:
                cmd += ["--image-size", str(args.image_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            per[method].append(r)
            print(f"  round {rnd + 1} {method:12s} step cpu {statistics.median(r['cpu_s_all']):.2f} s, wall "
                  f"{statistics.median(r['wall_s_all']):.2f} s, peak {C.mib(r['peak_bytes'])} MiB, load {r['loadavg']}",
                  flush=True)
    meta.update(arch=args.arch, batch=args.batch, frames=args.frames, words=args.words, rounds=args.rounds,
                steps=args.steps, warmup=args.warmup, loadavg_end=C.loadavg(), clock=args.clock,
                image_size=args.image_size or vop.get_arch(args.arch).vision.image_size,
                baseline="full" if "full" in methods else methods[0])
    results = []
    for m in methods:
        wall = [t for r in per[m] for t in r["wall_s_all"]]
        cpu = [t for r in per[m] for t in r["cpu_s_all"]]
        results.append({"method": m, "step_s": statistics.median(cpu if args.clock == "cpu" else wall),
                        "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
                        "wall_s_all": wall, "cpu_s_all": cpu,
                        "peak_bytes": statistics.median(r["peak_bytes"] for r in per[m]),
                        "peak_bytes_all": [r["peak_bytes"] for r in per[m]], "trainable": per[m][0]["trainable"]})
    base = next(r for r in results if r["method"] == meta["baseline"])
    for r in results:
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["memory_ratio"] = r["peak_bytes"] / max(base["peak_bytes"], 1)
    by = {r["method"]: r for r in results}
    checks = {}
    if "vop" in by and meta["baseline"] == "full":
        checks["vop_time_vs_full"] = {"value": by["vop"]["time_ratio"], "target": 0.85,
                                      "met": by["vop"]["time_ratio"] <= 0.85}
        checks["vop_memory_vs_full"] = {"value": by["vop"]["memory_ratio"], "target": 0.6,
                                        "met": by["vop"]["memory_ratio"] <= 0.6}
    if "vop" in by and "vop-f" in by:
        ratio = by["vop-f"]["step_s"] / by["vop"]["step_s"]
        checks["vop_f_time_vs_vop"] = {"value": ratio, "target": 1.3, "met": ratio <= 1.3}
    md = markdown(results, meta)
    if checks:
        md += "\n\nTargets: " + "; ".join(f"{k} = {v['value']:.2f} (target <= {v['target']}: "
                                          f"{'met' if v['met'] else 'missed'})" for k, v in checks.items()) + "."
    print(md)
    C.write_json(args.json, {"meta": meta, "results": results, "targets": checks})
    C.finish(args, "train_step", md)


if __name__ == "__main__":
    main()
