"""What checking an index's integrity costs when it opens (docs/search.md, "Integrity").

    python benchmarks/bench_index_verify.py [--videos 1000000] [--dim 512] [--repeat 5] [--json out.json]

Writes a synthetic index of ``--videos`` random unit vectors (``write_index``: float32, 2.05 GB at
1M x 512, plus a 54 MB video list) in a temporary folder (``--dir``), then times, interleaved and
``--repeat`` times each (files in the page cache, as for a server that restarts):

- ``VideoIndex.open(verify=True)``: the checksums (SHA-256) of the embeddings and the video list;
- ``VideoIndex.open(verify=False)`` (``--no-verify``): header, shape and size checks only;
- an index without checksums (as an older vop wrote it): the NaN/inf scan instead;
- the reader before checksums (``np.load`` + one ``json.loads`` per line), for reference;
- SHA-256 and BLAKE2b throughput on the embeddings file, and hashing a backbone-sized file
  (``--backbone-mb``, 351 MB: OpenAI's ViT-B-32.pt).

Everything it wrote is deleted at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from vop.retrieval.index import VideoIndex, write_index  # noqa: E402


def hash_file(path: Path, name: str) -> str:
    h = hashlib.new(name)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def old_reader(ix: Path) -> None:
    meta = json.loads((ix / "index.json").read_text())
    emb = np.ascontiguousarray(np.load(ix / meta["files"]["embeddings"]), dtype=np.float32)
    with open(ix / meta["files"]["videos"], encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    assert len(entries) == len(emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backbone-mb", type=int, default=351)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the temporary index (default: the system temp)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vop-bench-verify-", dir=args.dir))
    out: dict = {"videos": args.videos, "dim": args.dim, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "numpy": np.__version__, "load_before": os.getloadavg()}
    try:
        g = np.random.default_rng(0)
        emb = np.empty((args.videos, args.dim), np.float32)
        for s in range(0, args.videos, 100_000):
            e = g.standard_normal((min(100_000, args.videos - s), args.dim), dtype=np.float32)
            emb[s:s + len(e)] = e / np.linalg.norm(e, axis=1, keepdims=True)
        entries = [{"id": f"v{i}.mp4", "path": f"/nowhere/v{i}.mp4"} for i in range(args.videos)]
        t = time.perf_counter()
        write_index(work / "ix", emb, entries, {"model": {}, "settings": {}})
        out["write_index_s"] = time.perf_counter() - t
        del emb, entries
        ix = work / "ix"
        meta = json.loads((ix / "index.json").read_text())
        emb_file = ix / meta["files"]["embeddings"]
        out["embeddings_bytes"] = emb_file.stat().st_size
        out["videos_bytes"] = (ix / meta["files"]["videos"]).stat().st_size
        old = shutil.copytree(ix, work / "old")  # the same index without checksums
        m = json.loads((old / "index.json").read_text())
        del m["checksums"]
        (old / "index.json").write_text(json.dumps(m))

        import logging

        logging.getLogger("vop.retrieval").setLevel(logging.ERROR)  # the older-index warning, once per open
        cases = {
            "open verify=True (checksums)": lambda: VideoIndex.open(ix, verify=True),
            "open verify=False (--no-verify)": lambda: VideoIndex.open(ix, verify=False),
            "open an index without checksums (NaN/inf scan)": lambda: VideoIndex.open(old, verify=True),
            "the reader before checksums (np.load + json.loads per line)": lambda: old_reader(ix),
            "sha256 of the embeddings file": lambda: hash_file(emb_file, "sha256"),
            "blake2b of the embeddings file": lambda: hash_file(emb_file, "blake2b"),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():  # warm the page cache
            fn()
        for _ in range(args.repeat):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        bb = work / "backbone.bin"
        with open(bb, "wb") as f:
            f.write(np.random.default_rng(1).integers(0, 256, args.backbone_mb << 20, dtype=np.uint8).tobytes())
        hash_file(bb, "sha256")
        times[f"sha256 of a {args.backbone_mb} MB backbone file"] = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            hash_file(bb, "sha256")
            times[f"sha256 of a {args.backbone_mb} MB backbone file"].append(time.perf_counter() - t)
        out["seconds"] = {k: {"min": min(v), "median": statistics.median(v), "all": v} for k, v in times.items()}
        out["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = out["embeddings_bytes"] / 1e9
    print(f"{args.videos:,} videos x {args.dim}: embeddings {gb:.2f} GB, video list {out['videos_bytes'] / 1e6:.0f} MB; "
          f"load average {out['load_before'][0]:.1f} -> {out['load_after'][0]:.1f} on {os.cpu_count()} CPUs")
    for k, v in out["seconds"].items():
        print(f"  {k}: median {v['median']:.2f} s, best {v['min']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
