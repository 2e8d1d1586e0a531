"""Our ``vop`` training step against a port-style reimplementation (``port_baseline.py``).

Same frozen weights, same prompts (copied), same batch. The outputs and prompt gradients are checked
to agree first (else the script stops), then training steps (forward, symmetric InfoNCE, backward,
AdamW on the prompts) of ``ours``, ``port-mha`` and ``port-math`` are timed interleaved; the
reported time is the median. Speed-up = port time / our time.

    python benchmarks/bench_port.py                        # ViT-B/32, 2 x 12 frames, CPU (~3 min)
    python benchmarks/bench_port.py --arch tiny --frames 4 --repeats 2 --no-doc --json /tmp/port.json
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import port_baseline as P  # noqa: E402


def make_step(model, video, tokens, amp: bool):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    labels = torch.arange(video.shape[0], device=video.device)

    def step():
        with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=amp):
            v, t = model(video, tokens)
            logits = model.logit_scale * t @ v.t()
            loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().t(), labels)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/32")  # OpenAI's (QuickGELU), the paper's backbone
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each (default: %(default)s)")
    C.add_timing_args(p)
    C.add_common_args(p, "port_vitb32_cpu")
    args = p.parse_args()

    import torch

    import vop

    C.set_threads(args.threads)
    torch.manual_seed(0)
    meta = C.machine_meta("cpu", args.threads or None)
    clip = vop.build_clip(args.arch, seed=0)
    ours = vop.create_model("vop", clip, frames=args.frames).train()
    size = clip.cfg.vision.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size)
    tokens = C.caption_tokens(args.batch, min(args.words, ours.max_text_tokens))
    ports = {f"port-{a}": P.PortVoP(ours, a).train() for a in ("mha", "math")}
    agreement = {k: P.check_agreement(ours, m, video, tokens) for k, m in ports.items()}
    for k, a in agreement.items():
        print(f"  {k}: max |diff| video {a['video_max_abs']:.1e} text {a['text_max_abs']:.1e}, "
              f"prompt grads rel {a['grad_max_rel']:.1e}", flush=True)
    steps = {"ours": make_step(ours, video, tokens, False), **{k: make_step(m, video, tokens, False) for k, m in ports.items()}}
    tt = C.time_calls(steps, args.repeats)
    t = C.pick(tt, args.clock)
    rows = [{"impl": k, "step_s": C.median(v), "wall_s": C.median(tt[k]["wall"]), "cpu_s": C.median(tt[k]["cpu"]),
             "wall_s_all": tt[k]["wall"], "cpu_s_all": tt[k]["cpu"], "speedup_of_ours": C.median(v) / C.median(t["ours"])}
            for k, v in t.items()]
    meta.update(arch=args.arch, batch=args.batch, frames=args.frames, words=args.words, repeats=args.repeats,
                image_size=size, loadavg_end=C.loadavg(), clock=args.clock)
    L = [f"Measured {C.describe(meta)}; {args.arch}, batch {args.batch} x {args.frames} frames at {size} px, "
         f"{tokens.shape[1]}-token captions, float32; training step (forward, InfoNCE, backward, AdamW) median of "
         f"{args.repeats} interleaved steps after 1 warm-up, ratios of {'CPU' if args.clock == 'cpu' else 'wall'} time. "
         f"Outputs agree to "
         f"{max(max(a['video_max_abs'], a['text_max_abs']) for a in agreement.values()):.1e}. "
         "`python benchmarks/bench_port.py`.", "",
         "| implementation | step, CPU time (s) | step, wall (s) | port / ours (our speed-up) |", "| --- | ---: | ---: | ---: |"]
    L += [f"| {r['impl']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['speedup_of_ours']:.2f} |" for r in rows]
    md = "\n".join(L)
    print(md)
    C.write_json(args.json, {"meta": meta, "agreement": agreement, "results": rows})
    C.finish(args, "port", md)


if __name__ == "__main__":
    main()
