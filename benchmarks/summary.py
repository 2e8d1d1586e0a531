"""The summary table of docs/benchmarks.md: every target against what the JSON files under docs/bench/ hold.

Run by each benchmark script after it updates the docs (and by hand: ``python benchmarks/summary.py``).
A target whose measurement is missing says so; GPU columns read ``docs/bench/gpu.json`` (written by
``gpu_bench.py --render``) and say "pending" while it does not exist.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def _load(name: str, bench_dir: Path) -> dict | None:
    p = bench_dir / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _verdict(value: float | None, target: float, higher_is_better: bool = False, noise: float = 0.0) -> str:
    """``noise``: a miss by at most this fraction is reported as parity within noise, not as a success."""
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    if not met and noise and abs(value - target) <= noise * target:
        return f"{value:.2f} (missed by {abs(value - target) / target:.0%}: parity within noise)"
    return f"{value:.2f} ({'met' if met else 'missed'})"


def markdown(bench_dir: Path = C.BENCH_DIR) -> str:
    ts, port, enc, hf, gpu = (_load(n, bench_dir) for n in
                              ("train_step_vitb32_cpu", "port_vitb32_cpu", "encode_vitb32_cpu", "hf_vitb32_cpu", "gpu"))
    cpu: dict[str, str] = {}
    if ts:
        by = {r["method"]: r for r in ts["results"]}
        if "vop" in by and "full" in by:
            cpu["time"] = _verdict(by["vop"]["step_s"] / by["full"]["step_s"], 0.85)
            cpu["mem"] = _verdict(by["vop"]["peak_bytes"] / by["full"]["peak_bytes"], 0.6)
        if "vop" in by and "vop-f" in by:
            cpu["vopf"] = _verdict(by["vop-f"]["step_s"] / by["vop"]["step_s"], 1.3)
    if port:
        r = {x["impl"]: x for x in port["results"]}
        cpu["port"] = ", ".join(f"{k}: {_verdict(r[k]['speedup_of_ours'], 1.5, True)}" for k in ("port-mha", "port-math") if k in r)
    if hf:
        cpu["hf"] = ", ".join(f"{r['tower']}: {_verdict(r['ratio'], 1.0, noise=0.03)}" for r in hf["results"] if r["mode"] == "forward")
    g: dict[str, str] = {}
    gpu_name = None
    if gpu:
        gpu_name = gpu.get("sections", {}).get("device", {}).get("info", {}).get("name")
        t = gpu.get("targets", {})

        def gv(key, target, hib=False):
            return _verdict(t[key]["value"], target, hib) if key in t and t[key].get("value") is not None else "not measured"

        g = {"time": gv("vop_time_vs_full", 0.85), "mem": gv("vop_memory_vs_full", 0.6),
             "vopf": gv("vop_f_time_vs_vop", 1.3),
             "port": f"port-mha: {gv('port-mha_over_ours', 1.5, True)}, port-math: {gv('port-math_over_ours', 1.5, True)}",
             "mfu": gv("vop_mfu", 0.40, True)}
        hfr = gpu.get("sections", {}).get("hf", {}).get("forward", {})
        if isinstance(hfr, dict) and "results" in hfr:
            g["hf"] = ", ".join(f"{k}: {_verdict(v['ratio'], 1.0, noise=0.03)}" for k, v in hfr["results"].items())
    pending = "pending (no GPU run yet)"
    rows = [
        ("`vop` step time / `full` (<= 0.85)", "time"),
        ("`vop` peak memory / `full` (<= 0.6)", "mem"),
        ("`vop-f` step time / `vop` (<= 1.3)", "vopf"),
        ("port-style step time / our `vop` (>= 1.5)", "port"),
        ("our towers / Hugging Face, forward time (<= 1.0)", "hf"),
        ("MFU of `vop` training, bf16 (>= 40%, H100)", "mfu"),
    ]
    cpu_head = "CPU (ViT-B/32, batch 2 x 12 frames, float32)"
    gpu_head = f"GPU ({gpu_name})" if gpu_name else "GPU (ViT-B/32, batch 32 x 12 frames, bf16)"
    L = [f"| target | {cpu_head} | {gpu_head} |", "| --- | --- | --- |"]
    for label, key in rows:
        c = cpu.get(key, "n/a (MFU needs a peak FLOP/s: GPU only)" if key == "mfu" else "not measured")
        L.append(f"| {label} | {c} | {g.get(key, pending) if gpu else pending} |")
    if enc and "block_ratio" in enc:
        br = enc["block_ratio"]
        L += ["", f"VoP^F's joint layer against a per-frame layer (CPU, ViT-B/32, 12 frames): FLOPs x{br['flops']:.2f}, "
              f"forward time x{br['fwd']:.2f}, forward+backward time x{br['fwd_bwd']:.2f}."]
    return "\n".join(L)


def update(doc: str | os.PathLike | None = None) -> None:
    C.update_doc(doc or C.DOC, "summary", markdown())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", default=str(C.DOC), help="(default: %(default)s)")
    args = p.parse_args()
    print(markdown())
    update(args.doc)


if __name__ == "__main__":
    main()
