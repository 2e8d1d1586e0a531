"""Encoding throughput: the image tower alone, and whole videos through each method (no grad).

1. ``image tower``: ``clip.encode_image`` on N frames (frames/s), plain CLIP.
2. ``encode_video``: B videos x F frames through each method's image path (prompts, VoP^F's joint
   layers, VoP^C's BiLSTM), time relative to ``vop``; FLOPs counted with FlopCounterMode.
3. ``one block``: the first joint layer of VoP^F (block ks) on the video as VoP^F feeds it (one
   sequence of F*(1+M)+n tokens per video) against the same block as VoP feeds it (F sequences of
   1+n+M tokens), forward only and forward+backward (input gradients, frozen weights), with the
   analytic FLOPs of both. This isolates the cost of attending over the whole video.

All timings are interleaved (A B C A B C ...) and reported as medians.

    python benchmarks/bench_encode.py                         # ViT-B/32, 2 videos x 12 frames (~2 min)
    python benchmarks/bench_encode.py --arch tiny --frames 4 --image-batches 8 --repeats 2 --no-doc --json /tmp/e.json
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/32")  # OpenAI's (QuickGELU), the paper's backbone
    p.add_argument("--videos", type=int, default=2, help="videos per batch for encode_video (default: %(default)s)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--image-batches", default="12,48", help="frame batch sizes for the image tower (default: %(default)s)")
    p.add_argument("--methods", default="zeroshot,vop,vop-f,vop-fc", help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each measurement (default: %(default)s)")
    C.add_timing_args(p)
    C.add_common_args(p, "encode_vitb32_cpu")
    args = p.parse_args()

    import torch

    import vop

    C.set_threads(args.threads)
    torch.manual_seed(0)
    meta = C.machine_meta("cpu", args.threads or None)
    clip = vop.build_clip(args.arch, seed=0).eval()
    cfg = clip.cfg.vision
    size, B, F = cfg.image_size, args.videos, args.frames
    out: dict = {"meta": meta}

    # 1. image tower -----------------------------------------------------------------------------------
    batches = [int(x) for x in args.image_batches.split(",")]
    images = {n: torch.randn(n, 3, size, size) for n in batches}
    with torch.inference_mode():
        t = C.pick(C.time_calls({n: (lambda n=n: clip.encode_image(images[n])) for n in batches}, args.repeats), args.clock)
    out["image_tower"] = [{"frames": n, "s": C.median(t[n]), "s_all": t[n], "frames_per_s": n / C.median(t[n])}
                          for n in batches]
    for r in out["image_tower"]:
        print(f"  image tower {r['frames']:4d} frames: {r['frames_per_s']:.1f} frames/s", flush=True)

    # 2. encode_video per method ---------------------------------------------------------------------
    video = torch.randn(B, F, 3, size, size)
    models = {m: vop.create_model(m, clip, frames=F).eval() for m in args.methods.split(",")}
    flops = {}
    for m, model in models.items():
        with torch.inference_mode(), C.flop_counter() as fc:
            model.encode_video(video)
        flops[m] = fc.get_total_flops()
    with torch.inference_mode():
        t = C.pick(C.time_calls({m: (lambda model=model: model.encode_video(video)) for m, model in models.items()},
                                args.repeats), args.clock)
    ref = "vop" if "vop" in models else next(iter(models))
    out["encode_video"] = [{"method": m, "s": C.median(t[m]), "s_all": t[m], "videos_per_s": B / C.median(t[m]),
                            "time_vs_" + ref: C.median(t[m]) / C.median(t[ref]), "flops": flops[m],
                            "flops_vs_" + ref: flops[m] / flops[ref]} for m in models]
    for r in out["encode_video"]:
        print(f"  encode_video {r['method']:8s} {r['s'] * 1e3:8.1f} ms  x{r['time_vs_' + ref]:.2f} of {ref}  "
              f"{r['flops'] / 1e9:.1f} GFLOP", flush=True)

    # 3. one block: per-frame (VoP) against joint (VoP^F) ---------------------------------------------
    ks = round(2 * cfg.layers / 3)
    n, M, d = 8, cfg.num_patches, cfg.width
    blk = clip.visual.transformer.resblocks[min(ks, cfg.layers - 1)]
    per_frame = torch.randn(B * F, 1 + n + M, d)
    joint = torch.randn(B, F * (1 + M) + n, d)
    shapes = {"per-frame (vop)": per_frame, "joint (vop-f)": joint}

    def fwd_bwd(x):
        x = x.detach().requires_grad_(True)
        blk(x).sum().backward()

    with torch.inference_mode():
        tf = C.pick(C.time_calls({k: (lambda x=x: blk(x)) for k, x in shapes.items()}, args.repeats), args.clock)
    tb = C.pick(C.time_calls({k: (lambda x=x: fwd_bwd(x)) for k, x in shapes.items()}, args.repeats), args.clock)
    out["block"] = []
    for k, x in shapes.items():
        a = C.layer_flops(d, x.shape[1], x.shape[0], cfg.mlp_ratio)
        out["block"].append({"layout": k, "sequences": x.shape[0], "tokens": x.shape[1], "flops": a,
                             "fwd_s": C.median(tf[k]), "fwd_bwd_s": C.median(tb[k]),
                             "fwd_s_all": tf[k], "fwd_bwd_s_all": tb[k]})
    pf, jt = out["block"]
    out["block_ratio"] = {"fwd": jt["fwd_s"] / pf["fwd_s"], "fwd_bwd": jt["fwd_bwd_s"] / pf["fwd_bwd_s"],
                          "flops": jt["flops"]["total"] / pf["flops"]["total"],
                          "attention_flops": jt["flops"]["attention"] / pf["flops"]["attention"]}
    meta.update(arch=args.arch, videos=B, frames=F, image_size=size, repeats=args.repeats, loadavg_end=C.loadavg(),
                clock=args.clock)

    # report ------------------------------------------------------------------------------------------
    per = " (per CPU-second)" if args.clock == "cpu" else ""
    L = [f"Measured {C.describe(meta)}; {args.arch} at {size} px, float32, no grad (except the forward+backward "
         f"column), median of {args.repeats} interleaved repeats, {'CPU' if args.clock == 'cpu' else 'wall'} time. "
         "`python benchmarks/bench_encode.py`.", "",
         f"| image tower (plain CLIP) | time (ms) | frames/s{per} |", "| --- | ---: | ---: |"]
    L += [f"| {r['frames']} frames | {r['s'] * 1e3:.1f} | {r['frames_per_s']:.1f} |" for r in out["image_tower"]]
    L += ["", f"| encode_video, {B} videos x {F} frames | time (ms) | time / {ref} | GFLOP | FLOPs / {ref} | videos/s{per} |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
    L += [f"| `{r['method']}` | {r['s'] * 1e3:.1f} | {r['time_vs_' + ref]:.2f} | {r['flops'] / 1e9:.1f} | "
          f"{r['flops_vs_' + ref]:.2f} | {r['videos_per_s']:.2f} |" for r in out["encode_video"]]
    L += ["", f"| block {ks} (first joint layer), {B} videos | sequences x tokens | GFLOP (linear + attention) | "
          "forward (ms) | forward+backward (ms) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in out["block"]:
        f = r["flops"]
        L.append(f"| {r['layout']} | {r['sequences']} x {r['tokens']} | {f['total'] / 1e9:.2f} "
                 f"({f['linear'] / 1e9:.2f} + {f['attention'] / 1e9:.2f}) | {r['fwd_s'] * 1e3:.1f} | "
                 f"{r['fwd_bwd_s'] * 1e3:.1f} |")
    br = out["block_ratio"]
    L += ["", f"Joint / per-frame: FLOPs x{br['flops']:.2f} (attention alone x{br['attention_flops']:.1f}), "
          f"forward time x{br['fwd']:.2f}, forward+backward time x{br['fwd_bwd']:.2f}."]
    md = "\n".join(L)
    print(md)
    C.write_json(args.json, out)
    C.finish(args, "encode", md)


if __name__ == "__main__":
    main()
