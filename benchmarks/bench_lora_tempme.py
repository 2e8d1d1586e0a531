"""What LoRA and TempMe cost: image-tower multiply-adds, encode throughput, training-step time.

1. ``macs``: image-tower multiply-adds of one 12-frame video, analytic (patch embedding, projections,
   attention products, MLP; vop.methods.tempme.image_tower_macs, from the token schedule) for CLIP (= a
   merged ``lora``) and ``tempme`` on ViT-B/32 and ViT-B/16, next to torch's FLOP counter on the meta device
   (which also counts the unmerged LoRA products and TempMe's matching scores).
2. ``encode``: ``encode_video`` of B videos x F frames (no grad, eval mode) of ``zeroshot``, ``lora`` merged
   (eval mode's default: the update folded into a copy of the weights), ``lora`` unmerged, ``tempme``
   (its LoRA merged) and ``vop``, interleaved, medians; times relative to ``zeroshot``.
3. ``train``: one training step (B videos x F frames and B captions, InfoNCE, backward, AdamW) of ``full``,
   ``vop``, ``lora`` and ``tempme``, each in its own subprocess (bench_train_step.py's), interleaved rounds;
   times relative to ``full`` and to ``vop``.

    python benchmarks/bench_lora_tempme.py            # ViT-B/32, 2 videos x 12 frames, CPU (~10 min)
    python benchmarks/bench_lora_tempme.py --render saved.json     # the docs' block (and docs/bench/) from a saved run
    python benchmarks/bench_lora_tempme.py --arch tiny --frames 4 --repeats 2 --rounds 1 --steps 1 --no-doc --json /tmp/l.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

ENCODE = ("zeroshot", "lora", "lora-unmerged", "tempme", "vop")
TRAIN = ("full", "vop", "lora", "tempme")


def macs_section(frames: int) -> list[dict]:
    import torch

    import vop
    from vop.backbone.clip import CLIP
    from vop.methods.tempme import image_tower_macs

    rows = []
    for arch in ("ViT-B/32", "ViT-B/16"):
        cfg = vop.get_arch(arch)
        with torch.device("meta"):
            clip = CLIP(cfg)
            models = {m: vop.create_model(m, clip, frames=frames) for m in ("zeroshot", "lora", "tempme")}
        counted = {}
        for m, model in models.items():
            with torch.no_grad(), C.flop_counter() as fc:
                model.encode_frames(torch.empty(1, frames, 3, cfg.vision.image_size, cfg.vision.image_size, device="meta"))
            counted[m] = fc.get_total_flops() / 2
        sched = models["tempme"].schedule()
        base, ours = image_tower_macs(cfg.vision, frames), image_tower_macs(cfg.vision, frames, sched)
        tokens = sched[0].tokens * frames
        rows.append({"arch": arch, "frames": frames, "clip_macs": base, "tempme_macs": ours, "ratio": ours / base,
                     "counted_zeroshot": counted["zeroshot"], "counted_lora_unmerged": counted["lora"],
                     "counted_tempme": counted["tempme"], "counted_ratio": counted["tempme"] / counted["lora"],
                     "tokens_in": tokens, "tokens_out": sched[-1].mlp_tokens,
                     "schedule": [(L.seqs // L.group, L.attn_tokens, L.mlp_tokens) for L in sched]})
    return rows


def encode_section(args) -> list[dict]:
    import torch

    import vop

    torch.manual_seed(0)
    clip = vop.build_clip(args.arch, seed=0).eval()
    size = clip.cfg.vision.image_size
    video = torch.randn(args.videos, args.frames, 3, size, size)
    models = {}
    for name in ENCODE:
        m = vop.create_model(name.split("-")[0], clip, frames=args.frames)
        with torch.no_grad():  # a trained update (the cost does not depend on the values)
            for n, p in m.named_trainable_parameters():
                if n.endswith(".B"):
                    p.normal_(0, 0.01)
        m.eval()
        if name == "lora-unmerged":
            m.unmerge()
        models[name] = m
    with torch.inference_mode():
        t = C.pick(C.time_calls({m: (lambda mm=mm: mm.encode_video(video)) for m, mm in models.items()}, args.repeats),
                   args.clock)
    base = C.median(t["zeroshot"])
    return [{"method": m, "s": C.median(t[m]), "s_all": t[m], "videos_per_s": args.videos / C.median(t[m]),
             "time_vs_zeroshot": C.median(t[m]) / base} for m in models]


def train_section(args) -> list[dict]:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train_step.py")
    per: dict[str, list[dict]] = {m: [] for m in TRAIN}
    for rnd in range(args.rounds):
        for m in TRAIN:
            cmd = [sys.executable, script, "--one", m, "--arch", args.arch, "--batch", str(args.videos), "--frames",
                   str(args.frames), "--steps", str(args.steps), "--warmup", "1", "--threads", str(args.threads),
                   "--device", "cpu", "--words", "32", "--clock", args.clock]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{m} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            per[m].append(r)
            print(f"  train round {rnd + 1} {m:8s} cpu {statistics.median(r['cpu_s_all']):.2f} s", flush=True)
    rows = []
    for m in TRAIN:
        times = [t for r in per[m] for t in r["cpu_s_all" if args.clock == "cpu" else "wall_s_all"]]
        rows.append({"method": m, "step_s": C.median(times), "s_all": times, "trainable": per[m][0]["trainable"],
                     "peak_bytes": statistics.median(r["peak_bytes"] for r in per[m])})
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["time_vs_full"] = r["step_s"] / by["full"]["step_s"]
        r["time_vs_vop"] = r["step_s"] / by["vop"]["step_s"]
        r["memory_vs_full"] = r["peak_bytes"] / max(by["full"]["peak_bytes"], 1)
    return rows


def markdown(data: dict) -> str:
    meta = data["meta"]
    clock = "CPU time" if meta["clock"] == "cpu" else "wall time"
    lines = ["Image-tower multiply-adds of one video (analytic: patch embedding, projections, attention products, "
             "MLP; LayerNorms, softmax and the merges' sort/gather/scatter not counted) and torch's FLOP counter "
             "(meta device, / 2; it also counts the unmerged LoRA products and TempMe's matching scores). "
             "`python benchmarks/bench_lora_tempme.py`.", "",
             "| backbone | frames | CLIP = merged `lora` (GMACs) | `tempme` (GMACs) | ratio | counted: `tempme` / unmerged `lora` "
             "| tokens in -> out |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["macs"]:
        lines.append(f"| {r['arch']} | {r['frames']} | {r['clip_macs'] / 1e9:.2f} | {r['tempme_macs'] / 1e9:.2f} | "
                     f"{r['ratio']:.3f} ({100 * (r['ratio'] - 1):+.1f}%) | {r['counted_ratio']:.3f} | "
                     f"{r['tokens_in']:,} -> {r['tokens_out']:,} |")
    e = data.get("encode")
    if e:
        lines += ["", f"`encode_video`, {meta['arch']}, {meta['videos']} videos x {meta['frames']} frames, float32, "
                  f"{C.describe(meta)}; median of {meta['repeats']} interleaved repeats, {clock}:", "",
                  "| model | ms per batch | videos/s | time / `zeroshot` |", "| --- | ---: | ---: | ---: |"]
        names = {"lora": "`lora` (merged: eval mode's default)", "lora-unmerged": "`lora` unmerged",
                 "tempme": "`tempme` (its LoRA merged)"}
        for r in e:
            lines.append(f"| {names.get(r['method'], '`' + r['method'] + '`')} | {r['s'] * 1e3:.0f} | "
                         f"{r['videos_per_s']:.2f} | {r['time_vs_zeroshot']:.2f} |")
    t = data.get("train")
    if t:
        lines += ["", f"Training step, {meta['arch']}, batch {meta['videos']} x {meta['frames']} frames, 32-token "
                  f"captions, float32, one subprocess per method, {meta['rounds']} interleaved rounds x {meta['steps']} "
                  f"steps, median {clock}; peak memory = peak RSS growth of the method's process:", "",
                  "| method | trainable | step (s) | time / `full` | time / `vop` | memory / `full` |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in t:
            lines.append(f"| `{r['method']}` | {r['trainable']:,} | {r['step_s']:.2f} | {r['time_vs_full']:.2f} | "
                         f"{r['time_vs_vop']:.2f} | {r['memory_vs_full']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/32")
    p.add_argument("--videos", type=int, default=2, help="videos per batch (default: %(default)s)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5, help="timed encode repeats (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved training-step rounds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: %(default)s)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: encode, train")
    p.add_argument("--render", default=None, metavar="JSON", help="only write the docs' block from a saved result")
    C.add_timing_args(p)
    C.add_common_args(p, "lora_tempme_cpu")
    args = p.parse_args()
    if args.render:
        data = json.loads(open(args.render).read())
        if args.json and os.path.abspath(args.json) != os.path.abspath(args.render):
            C.write_json(args.json, data)
        C.finish(args, "lora_tempme", markdown(data))
        return
    C.set_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    meta = C.machine_meta("cpu", args.threads or None)
    meta.update(arch=args.arch, videos=args.videos, frames=args.frames, repeats=args.repeats, rounds=args.rounds,
                steps=args.steps, clock=args.clock)
    data: dict = {"meta": meta, "macs": macs_section(12)}
    for r in data["macs"]:
        print(f"  {r['arch']}: CLIP {r['clip_macs'] / 1e9:.2f} GMACs, tempme {r['tempme_macs'] / 1e9:.2f} ({r['ratio']:.3f}); "
              f"counted ratio {r['counted_ratio']:.3f}", flush=True)
    if "encode" not in skip:
        data["encode"] = encode_section(args)
        for r in data["encode"]:
            print(f"  encode {r['method']:14s} {r['s'] * 1e3:8.1f} ms  x{r['time_vs_zeroshot']:.2f} of zeroshot", flush=True)
    if "train" not in skip:
        data["train"] = train_section(args)
    meta["loadavg_end"] = C.loadavg()
    md = markdown(data)
    print(md)
    C.write_json(args.json, data)
    C.finish(args, "lora_tempme", md)


if __name__ == "__main__":
    main()
