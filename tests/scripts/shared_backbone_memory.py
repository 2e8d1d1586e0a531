"""Memory and time of N prompt models over ONE backbone ("one backbone, many prompt sets", as
vop.retrieval.search.BackbonePool serves them): created with ``create_model`` and loaded from their
checkpoints with ``load_trainable`` (BackbonePool's path) and ``load_checkpoint(path, clip)``.

    PYTHONPATH=src python tests/scripts/shared_backbone_memory.py [--arch ViT-B/32] [--n 8]

Prints one JSON line per phase: the resident set size added (VmRSS from /proc/self/status, MiB), the
bytes of tensor storage held by the models that are not the backbone's (every parameter's storage,
each counted once), the wall time (and the fastest and median model: robust on a shared machine), and
whether the backbone's requires_grad flags are as they were. Random backbone weights (seed 0): the sizes
are ViT-B/32's. ``--methods bias,partial,full`` shows the copies of the CLIP tensors a method trains.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def storages(modules) -> dict[int, int]:
    out = {}
    for m in modules:
        for p in m.parameters():
            s = p.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B/32")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--methods", default="vop,vop-f,vop-p,vop-fp")
    args = ap.parse_args()
    import vop
    from vop.methods.checkpoint import load_trainable, read_checkpoint_meta

    torch.set_num_threads(1)
    methods = args.methods.split(",")
    clip = vop.build_clip(args.arch, seed=0).eval()
    backbone = storages([clip])
    flags = {n: p.requires_grad for n, p in clip.named_parameters()}
    tmp = Path(tempfile.mkdtemp())
    paths = []
    for i in range(args.n):  # the checkpoints (written before the measurements)
        torch.manual_seed(i)
        m = vop.create_model(methods[i % len(methods)], clip)
        paths.append(vop.save_checkpoint(m, tmp / f"p{i}.safetensors", backbone=args.arch))
        del m
    metas = [read_checkpoint_meta(p) for p in paths]
    gc.collect()

    def phase(name, build):
        gc.collect()
        r0, t0, times, models = rss_mib(), time.perf_counter(), [], []
        for i in range(args.n):
            t = time.perf_counter()
            models.append(build(i))
            times.append(time.perf_counter() - t)
        dt = time.perf_counter() - t0
        times.sort()
        own = {k: v for k, v in storages(models).items() if k not in backbone}
        unchanged = {n: p.requires_grad for n, p in clip.named_parameters()} == flags
        print(json.dumps({"phase": name, "n": args.n, "arch": args.arch, "rss_added_mib": round(rss_mib() - r0, 1),
                          "own_storage_mib": round(sum(own.values()) / 2**20, 2),
                          "backbone_mib": round(sum(backbone.values()) / 2**20, 1),
                          "seconds": round(dt, 3), "per_model_ms": round(1000 * dt / args.n, 1),
                          "min_ms": round(1000 * times[0], 1), "median_ms": round(1000 * times[len(times) // 2], 1),
                          "caller_flags_unchanged": unchanged}))
        return models

    def created(i):
        return vop.create_model(metas[i]["method"], clip, frames=metas[i]["frames"], **metas[i]["options"])

    def pool_loaded(i):  # BackbonePool.model_for: create_model + load_trainable over the pool's CLIP
        m = created(i)
        load_trainable(m, paths[i], metas[i])
        return m.eval()

    def loaded(i):
        return vop.load_checkpoint(paths[i], clip).eval()

    for name, build in (("create_model", created), ("create+load_trainable", pool_loaded), ("load_checkpoint", loaded)):
        models = phase(name, build)
        del models


if __name__ == "__main__":
    main()
