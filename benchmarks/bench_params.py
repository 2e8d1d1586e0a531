"""Trainable parameters and prompt-checkpoint file size of every method, per architecture.

For each architecture a CLIP with random weights is built (``vop.build_clip``; the sizes do not depend
on the values), every registered method is created on it with 12 frames, saved with
``vop.save_checkpoint`` into a temporary folder, and the file is measured with ``os.stat``. The file
holds the trainable tensors (float32) plus JSON metadata; for ``full`` it is the whole model.

    python benchmarks/bench_params.py                          # ViT-B/32 and ViT-B/16 (~1 min)
    python benchmarks/bench_params.py --archs tiny --no-doc --json /tmp/p.json   # smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def measure(arch: str, methods: list[str], frames: int, tmp: Path) -> list[dict]:
    import vop

    clip = vop.build_clip(arch, seed=0)
    rows = []
    for method in methods:
        model = vop.create_model(method, clip, frames=frames)
        counts = model.parameter_counts()
        path = tmp / f"{arch}-{method}.safetensors"
        t0 = time.perf_counter()
        vop.save_checkpoint(model, path)
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        path.unlink()
        tensor_bytes = sum(p.numel() * p.element_size() for p in model.trainable_parameters())
        rows.append({"arch": arch, "method": method, **counts, "percent": 100 * counts["trainable"] / counts["backbone"],
                     "file_bytes": size, "tensor_bytes": tensor_bytes, "metadata_bytes": size - tensor_bytes,
                     "save_s": save_s})
        print(f"  {arch:9s} {method:12s} trainable {counts['trainable']:>12,}  file {C.human_bytes(size):>9s}", flush=True)
        del model
    return rows


def markdown(results: list[dict], meta: dict) -> str:
    archs = list(dict.fromkeys(r["arch"] for r in results))
    by = {(r["arch"], r["method"]): r for r in results}
    methods = list(dict.fromkeys(r["method"] for r in results))
    head = "| method | " + " | ".join(f"{a} trainable | % of backbone | file" for a in archs) + " |"
    sep = "| --- | " + " | ".join("---: | ---: | ---:" for _ in archs) + " |"
    lines = [f"Measured {C.describe(meta)}; {meta['frames']} frames; `python benchmarks/bench_params.py`.", "",
             head, sep]
    for m in methods:
        cells = []
        for a in archs:
            r = by.get((a, m))
            if r is None:
                cells.append("- | - | -")
                continue
            extra = f" (+{r['uncounted']:,})" if r["uncounted"] else ""
            cells.append(f"{r['counted']:,}{extra} | {r['percent']:.3f} | {C.human_bytes(r['file_bytes'])}")
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    backbones = ", ".join(f"{a}: {by[(a, methods[0])]['backbone']:,}" for a in archs)
    lines += ["", f"Backbone parameters: {backbones}. \"(+n)\": trainable tensors the paper does not count "
              "(VoP^F's frame position embedding), included in the percentage and the file. A file holds only the "
              "trained tensors (float32 safetensors, 4 bytes each) plus ~1 kB of JSON metadata, never the frozen "
              "backbone; for `full` the trained tensors are the whole CLIP."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="ViT-B-32,ViT-B-16", help="comma-separated (default: %(default)s)")
    p.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    p.add_argument("--frames", type=int, default=12)
    C.add_common_args(p, "params")
    args = p.parse_args()
    import vop

    methods = vop.list_methods() if args.methods == "all" else args.methods.split(",")
    meta = {**C.machine_meta(), "frames": args.frames}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            results += measure(arch, methods, args.frames, Path(tmp))
    C.write_json(args.json, {"meta": meta, "results": results})
    md = markdown(results, meta)
    print(md)
    C.finish(args, "params", md)


if __name__ == "__main__":
    main()
