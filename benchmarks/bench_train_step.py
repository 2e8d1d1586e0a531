"""Training-step cost of each method relative to full fine-tuning, measured in one run.

A step = forward of B videos x F frames and B captions, symmetric InfoNCE, backward, AdamW step.
Each method runs in its own subprocess so that peak memory is its own. Peak memory is the whole cost
of training: weights, gradients, optimiser state and activations.
- CUDA: torch.cuda.max_memory_allocated over the run;
- CPU: peak resident set size (getrusage) minus the resident size after importing torch and vop,
  before anything is built.

    python benchmarks/bench_train_step.py                      # ViT-B/32, 2 x 12 frames, CPU
    python benchmarks/bench_train_step.py --arch tiny --frames 4 --image-size 32   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(method: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import vop

    rss0 = _rss_bytes()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    clip = vop.build_clip(args.arch, seed=0)
    model = vop.create_model(method, clip, frames=args.frames).to(device).train()
    size = args.image_size or clip.cfg.vision.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=device)
    tokens = model.tokenizer(max_words=32)([f"caption number {i} of a video" for i in range(args.batch)]).to(device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    labels = torch.arange(args.batch, device=device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            v, t = model(video, tokens)
            logits = model.logit_scale * t @ v.t()
            loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().t(), labels)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    counts = model.parameter_counts()
    return {"method": method, "step_s": statistics.median(times), "step_s_all": times,
            "peak_bytes": peak, "trainable": counts["trainable"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--methods", default="full,vop,vop-f,vop-fc")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--arch", args.arch, "--batch", str(args.batch),
               "--frames", str(args.frames), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--device", args.device]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"  {method:8s} step {r['step_s']:.3f} s  peak {r['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    base = next((r for r in results if r["method"] == "full"), results[0])
    import torch

    print(f"\n{args.arch}, batch {args.batch} x {args.frames} frames, {args.device}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {datetime.now(timezone.utc):%Y-%m-%d}")
    print(f"| method | trainable | step (s) | time / {base['method']} | peak memory (MiB) | memory / {base['method']} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["memory_ratio"] = r["peak_bytes"] / max(base["peak_bytes"], 1)
        print(f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {r['time_ratio']:.2f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {r['memory_ratio']:.2f} |")
    if args.json:
        meta = {"arch": args.arch, "batch": args.batch, "frames": args.frames, "device": args.device,
                "torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
