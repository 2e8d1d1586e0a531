"""Time vop's restricted TorchScript reader against torch.jit.load on a ViT-B/32-sized archive.

Builds OpenAI's module layout (tests/openai_clip.py) at ViT-B/32 size with random weights, traces it
in fp16 as OpenAI's released file is, saves it, then reads it back both ways (best of --repeat) and
checks the two state dicts are identical.

    PYTHONPATH=src python tests/scripts/torchscript_timing.py [--out /tmp/vitb32-fp16.pt] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import openai_clip  # noqa: E402

from vop.formats.torchscript import read_torchscript  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/vitb32-fp16.pt"))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if not a.out.exists():
        t = time.perf_counter()
        m = openai_clip.build(width=768, layers=12, heads=12, image=224, patch=32, embed=512, text_width=512, text_heads=8)
        openai_clip.save_archive(a.out, m, dtype=torch.float16)
        print(f"built {a.out} in {time.perf_counter() - t:.1f}s")
    print(f"{a.out}: {a.out.stat().st_size / 2**20:.1f} MiB, torch {torch.__version__}, {torch.get_num_threads()} threads")
    times: dict[str, list[float]] = {"vop reader": [], "torch.jit.load + state_dict": []}
    for _ in range(a.repeat):
        t = time.perf_counter()
        ours = read_torchscript(a.out)
        times["vop reader"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = torch.jit.load(str(a.out), map_location="cpu").state_dict()
        times["torch.jit.load + state_dict"].append(time.perf_counter() - t)
    assert list(ours) == list(ref) and all(
        ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]) for k in ref), "state dicts differ"
    n = sum(v.numel() for v in ours.values())
    print(f"{len(ours)} tensors, {n:,} elements, identical")
    for name, ts in times.items():
        print(f"{name}: best {min(ts):.3f}s of {len(ts)} ({', '.join(f'{x:.3f}' for x in ts)})")


if __name__ == "__main__":
    main()
