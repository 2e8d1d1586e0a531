"""The backbones people use now against OpenAI's CLIP ViT-B/16, measured in one run: encoding throughput and
the training step of basic VoP on each family's B model (EVA02-B-16, PE-Core-B-16, ViT-B-16-SigLIP2) relative to
ViT-B/16.

Per backbone (random weights of the architecture, each in its own subprocess so that memory is its own;
``--rounds`` interleaved rounds, ViT-B/16, EVA02, PE, ViT-B/16, ...; medians of every timed call):

- image tower: ``encode_frames`` of zero-shot on B videos x F frames at the backbone's native size
  (frames/s);
- text tower: ``encode_text`` of zero-shot on C captions of 32 tokens (PE-Core's context: 32; SigLIP2's text
  tower always reads its 64 positions, the caption padded to them, as its tokenizer gives them);
- VoP training step: B videos x F frames and B captions (of the model's caption budget: 32 tokens, PE-Core's
  32 - 8 = 24, SigLIP2's 64 positions with the 8 prompts on top), symmetric InfoNCE (SigLIP's logit bias does
  not enter it: the loss is shift-invariant, as in vop's trainer), backward, AdamW.

Times: CPU seconds of the process (``--clock cpu``, the default: robust to other jobs on a shared machine),
one torch thread by default.

    python benchmarks/bench_backbones.py     # ViT-B-16, EVA02-B-16, PE-Core-B-16, ViT-B-16-SigLIP2 (~20 min, 1 thread)
    python benchmarks/bench_backbones.py --archs tiny,eva02-tiny,pe-core-tiny,siglip-tiny --frames 2 --no-doc --json /tmp/b.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

ARCHS = "ViT-B-16,EVA02-B-16,PE-Core-B-16,ViT-B-16-SigLIP2"


def text_length(model) -> int:
    """Caption tokens the text tower runs on: 32 (or the model's budget if smaller: PE-Core), and a text tower read
    at its last position (SigLIP) always its whole context (its tokenizer pads every caption to it)."""
    if model.clip.cfg.text.pool == "last":
        return model.max_text_tokens
    return min(32, model.max_text_tokens)


def run_one(arch: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import vop

    torch.manual_seed(0)
    C.set_threads(args.threads)
    t0 = time.perf_counter()
    clip = vop.build_clip(arch, seed=0)
    built = time.perf_counter() - t0
    size = clip.cfg.vision.image_size
    B, Fr = args.batch, args.frames
    video = torch.randn(B, Fr, 3, size, size)
    zs = vop.create_model("zeroshot", clip, frames=Fr).eval()
    vocab = clip.cfg.text.vocab_size  # ids inside the vocabulary (the tiny SigLIP record has 1,000; CLIP's unchanged)
    captions = C.caption_tokens(args.captions, text_length(zs)) % vocab
    with torch.inference_mode():
        t = C.pick(C.time_calls({"image": lambda: zs.encode_frames(video),
                                 "text": lambda: zs.encode_text(captions)}, args.repeats), args.clock)
    model = vop.create_model("vop", clip, frames=Fr).train()
    tokens = C.caption_tokens(B, text_length(model)) % vocab
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    labels = torch.arange(B)

    def step() -> None:
        v, tt = model(video, tokens)
        logits = model.logit_scale * tt @ v.t()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = C.pick(C.time_calls({"step": step}, args.steps, warmup=args.warmup), args.clock)["step"]
    counts = model.parameter_counts()
    return {"arch": arch, "family": clip.cfg.family, "image_size": size, "text_tokens": int(tokens.shape[1]),
            "image_s_all": t["image"], "text_s_all": t["text"], "step_s_all": s, "build_s": built,
            "vop_trainable": counts["trainable"], "backbone": counts["backbone"], "loadavg": C.loadavg()}


def markdown(results: list[dict], meta: dict) -> str:
    base = meta["baseline"]
    clock = "CPU time" if meta["clock"] == "cpu" else "wall time"
    lines = [f"Measured {C.describe(meta)}; random weights of each architecture at its native size, {meta['batch']} "
             f"videos x {meta['frames']} frames; text: {meta['captions']} captions of 32 tokens (PE-Core: its "
             f"32-token context; SigLIP2: its 64 positions, always filled); VoP step: captions of the model's budget "
             f"(PE-Core: 32 - 8 = 24; SigLIP2: 64 + the 8 prompts), float32; medians "
             f"of {meta['rounds']} interleaved rounds; ratios of {clock} against {base} in the same run. "
             "`python benchmarks/bench_backbones.py`.", "",
             f"| backbone | parameters | VoP trainable | image tower (frames/s) | x {base} | text tower (captions/s) | "
             f"x {base} | VoP step (s) | x {base} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| `{r['arch']}` | {r['backbone']:,} | {r['vop_trainable']:,} | {r['frames_per_s']:.1f} | "
                     f"{r['image_ratio']:.2f} | {r['captions_per_s']:.1f} | {r['text_ratio']:.2f} | {r['step_s']:.2f} | "
                     f"{r['step_ratio']:.2f} |")
    lines += ["", "Throughput ratios above 1 are faster than the baseline; the step ratio is time (above 1: slower)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=ARCHS, help="comma-separated; the first is the baseline (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="videos (default: %(default)s)")
    p.add_argument("--frames", type=int, default=4, help="frames per video (default: %(default)s)")
    p.add_argument("--captions", type=int, default=16, help="captions for the text tower (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed encodes per round (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed VoP steps per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of subprocesses (default: %(default)s)")
    C.add_timing_args(p)
    C.add_common_args(p, "backbones_cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one backbone, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    archs = args.archs.split(",")
    per: dict[str, list[dict]] = {a: [] for a in archs}
    meta = C.machine_meta("cpu", args.threads or None)
    for rnd in range(args.rounds):
        for arch in archs:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", arch, "--batch", str(args.batch), "--frames",
                   str(args.frames), "--captions", str(args.captions), "--repeats", str(args.repeats), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--clock", args.clock]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{arch} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            per[arch].append(r)
            print(f"  round {rnd + 1} {arch:14s} image {C.median(r['image_s_all']):.2f} s, text "
                  f"{C.median(r['text_s_all']):.2f} s, VoP step {C.median(r['step_s_all']):.2f} s, load {r['loadavg']}",
                  flush=True)
    meta.update(batch=args.batch, frames=args.frames, captions=args.captions, rounds=args.rounds, steps=args.steps,
                repeats=args.repeats, clock=args.clock, baseline=archs[0], loadavg_end=C.loadavg())
    results = []
    for a in archs:
        rs = per[a]
        image = C.median(t for r in rs for t in r["image_s_all"])
        text = C.median(t for r in rs for t in r["text_s_all"])
        step = C.median(t for r in rs for t in r["step_s_all"])
        results.append({**{k: rs[0][k] for k in ("arch", "family", "image_size", "text_tokens", "vop_trainable",
                                                   "backbone")},
                        "image_s": image, "text_s": text, "step_s": step,
                        "frames_per_s": args.batch * args.frames / image, "captions_per_s": args.captions / text,
                        "runs": rs})
    base = results[0]
    for r in results:
        r["image_ratio"] = r["frames_per_s"] / base["frames_per_s"]
        r["text_ratio"] = r["captions_per_s"] / base["captions_per_s"]
        r["step_ratio"] = r["step_s"] / base["step_s"]
    md = markdown(results, meta)
    print(md)
    C.write_json(args.json, {"meta": meta, "results": results})
    C.finish(args, "backbones", md)


if __name__ == "__main__":
    main()
