"""Search benchmarks: query latency (text encoding + search) at 10k / 100k / 1M videos, exact vs FAISS
with recall@10, index build throughput, HTTP load on 127.0.0.1, memory of one vs two prompt sets.

    python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--json docs/bench/bench_search.json]

Sections (each can be skipped with --skip NAME):

- ``encode``: text-encoding latency of one query (ViT-B/32 with VoP-F prompts, random weights: the cost
  does not depend on the values; and the tiny backbone).
- ``search``: random L2-normalised embeddings of dimension ``--dim`` (512 = ViT-B/32; ``--data clustered``
  for vectors in 1000 clusters, closer to real embeddings than the uniform default). Per size: exact
  search (one streamed matrix product + top-k) and FAISS IVF-Flat (nlist = sqrt(N), nprobe 8/32/128)
  and HNSW-Flat (M 32, ef_construction 200, ef_search 64/128/256; up to ``--hnsw-max`` vectors), with
  build time and recall@10 against exact, for two query kinds: ``near`` (a stored vector plus noise,
  cosine ~0.7 to it: a query that has a true match) and ``uniform`` (random directions: the worst
  case, where the 10 nearest neighbours are barely nearer than the rest).
- ``build``: ``vop.retrieval.build_index`` throughput (videos/s) on generated 320x240, 5 s clips with
  ViT-B/32 + VoP-F at 224 px, 12 frames; and on the synthetic world with the tiny backbone.
- ``load``: ``vop serve`` in a subprocess on 127.0.0.1 with two prompt sets (tiny backbone); N queries
  at concurrency C (alternating prompt sets), plus malformed requests; p50/p99 latency, errors.
- ``memory``: resident memory of a process serving one vs two ViT-B/32 prompt sets (shared backbone),
  and two prompt sets each with its own backbone (what sharing saves).
- ``stores``: the same embeddings (``--dim``, ``--data``) in the faiss store (the index folder, exact search)
  and the Milvus store in a Milvus Lite file (``vop[milvus]``), through ``VideoIndex`` (what ``vop search``
  runs): writing the collection (videos/s), opening the index (with and without the key check), one query at
  a time with FLAT (exact: recall and largest score difference against the faiss store), IVF_FLAT (nlist
  sqrt(N), nprobe 8/32/128; index build time) and HNSW (M 32, ef 64/128/256; up to ``--milvus-hnsw-max``).
  ``--only stores --json docs/bench/bench_stores.json`` runs just this section.
- ``scale`` (not in the default run: ``--only scale``): IVF-PQ at ``--scale-sizes`` (10M by default) through the
  library's path: vectors generated in blocks into a ``.npy``, ``write_index`` with the parameters ``--ann auto``
  (``--scale-ann``) resolves, exact top-10 by a chunked scan, ``VideoIndex.search`` over an nprobe x rerank grid;
  build time, peak memory per phase, file sizes. ``--scale-keep`` keeps the index, ``--scale-index PATH``
  measures a kept one again, ``--scale-again`` repeats each setting (page cache warm) and times the IVF-PQ alone.
- ``pairwise`` (``--only pairwise``): cma's query score at ``--pairwise-videos`` synthetic videos, exact vs
  candidates then re-scoring.
- ``latency`` (``--only latency``): ``vop serve`` end to end on a ``--latency-videos`` index, fp32 vs ``--text-int8`` text tower,
  distinct vs repeated (cached) queries; int8's ranking change on the demo's queries.

Everything runs on this machine only; the load test talks to 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import vop  # noqa: E402
from vop.retrieval import build_index, checkpoint_info, write_index  # noqa: E402


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def log(msg):
    print(msg, flush=True)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_unit(n, d, seed):
    g = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in blocks: no float64 copy of the whole matrix
        x = g.standard_normal((min(100_000, n - s), d), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def clustered_unit(n, d, seed, clusters=1000):
    """Unit vectors in ``clusters`` groups (cosine about 0.8 to their group's centre): closer to real
    embeddings, which are far from uniform on the sphere."""
    g = np.random.default_rng(seed)
    centres = random_unit(clusters, d, seed + 1)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[g.integers(0, clusters, m)] + (0.75 / np.sqrt(d)) * g.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_ckpt(out: Path, method: str, backbone: str, seed: int, frames: int = 12) -> Path:
    torch.manual_seed(seed)
    m = vop.create_model(method, backbone, frames=frames)
    with torch.no_grad():  # not the initial values: a "trained" prompt set
        for p in m.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vop.save_checkpoint(m, out, extra={"backbone": backbone})


# -------------------------------------------------------------------------------------------------
def bench_encode(args, tmp: Path) -> dict:
    from vop.retrieval.search import encode_queries

    out = {}
    default = torch.get_num_threads()
    for bb, method in (("ViT-B/32", "vop-f"), ("tiny", "vop-fc")):
        model = vop.create_model(method, bb, frames=12).eval()
        tok = model.tokenizer(32)
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            qs = [f"a person number {i} slices a red tomato on a wooden board" for i in range(args.encode_queries + 3)]
            lat = []
            for i, q in enumerate(qs):
                t = time.perf_counter()
                encode_queries(model, [q], tokenizer=tok)
                if i >= 3:
                    lat.append(time.perf_counter() - t)
            r = out[f"{bb}/threads{threads}"] = {"method": method, "threads": threads, "queries": len(lat),
                                                 "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
            log(f"encode {bb} ({method}), {threads} thread(s): p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms")
        del model
    torch.set_num_threads(default)
    return out


def _recall(exact_rows, rows):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(exact_rows, rows)]))


def _time_index(index, queries, truth, picks, nq, k):
    """One query at a time through a FAISS index: recall@10 against the exact top-k and latency per query kind."""
    res = {}
    for kind, q in queries.items():
        lat, rows = [], []
        for i in range(nq):
            t = time.perf_counter()
            _, rr = index.search(q[i:i + 1], k)
            lat.append(time.perf_counter() - t)
            rows.append(rr[0])
        res[kind] = {"recall10": _recall(truth[kind], np.stack(rows)), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
        if kind == "near":
            res[kind]["match_found"] = float(np.mean([p in rr for p, rr in zip(picks, rows)]))
    return res


def bench_search(args, tmp: Path) -> dict:
    import faiss

    from vop.retrieval.ann import build_faiss
    from vop.retrieval.index import exact_search

    d, k, nq = args.dim, 10, args.search_queries
    out = {}
    for n in args.sizes:
        log(f"--- {n:,} x {d}, {args.data} ---")
        t = time.perf_counter()
        emb = random_unit(n, d, seed=n) if args.data == "uniform" else clustered_unit(n, d, seed=n)
        g = np.random.default_rng(1)
        picks = g.integers(0, n, nq)
        noise = g.standard_normal((nq, d), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        near = emb[picks] + 1.0 * noise  # cosine to its source about 0.7
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        queries = {"near": near.astype(np.float32), "uniform": random_unit(nq, d, seed=7)}
        log(f"generated in {time.perf_counter() - t:.1f} s")
        r: dict = {"n": n, "dim": d, "queries": nq}
        emb_t = torch.from_numpy(emb)
        truth = {}
        default = torch.get_num_threads()
        for threads in sorted({1, default}, reverse=True):
            torch.set_num_threads(threads)
            lat = []
            for kind, q in queries.items():
                rows = []
                for i in range(nq):
                    t = time.perf_counter()
                    _, rr = exact_search(emb_t, torch.from_numpy(q[i:i + 1]), k)
                    lat.append(time.perf_counter() - t)
                    rows.append(rr[0])
                truth[kind] = np.stack(rows)
            r[f"exact/threads{threads}"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
            log(f"exact, {threads} thread(s): p50 {pct(lat, 50):.2f} ms  p99 {pct(lat, 99):.2f} ms")
        torch.set_num_threads(default)
        if not args.no_faiss:
            t = time.perf_counter()
            index, params = build_faiss(emb, "ivf", {})
            r["ivf"] = {"build_s": time.perf_counter() - t, "nlist": params["nlist"], "by_nprobe": {}}
            log(f"ivf nlist {params['nlist']}: built in {r['ivf']['build_s']:.1f} s")
            for nprobe in (8, 32, 128):
                index.nprobe = nprobe
                res = _time_index(index, queries, truth, picks, nq, k)
                r["ivf"]["by_nprobe"][nprobe] = res
                log(f"  nprobe {nprobe}: near R@10 {res['near']['recall10']:.3f} (match {res['near']['match_found']:.2f}) p50 {res['near']['p50_ms']:.2f} ms | "
                    f"uniform R@10 {res['uniform']['recall10']:.3f} p50 {res['uniform']['p50_ms']:.2f} ms")
            del index
            if n <= args.hnsw_max:
                t = time.perf_counter()
                index, params = build_faiss(emb, "hnsw", {})
                r["hnsw"] = {"build_s": time.perf_counter() - t, "M": params["M"], "ef_construction": params["ef_construction"],
                             "by_ef": {}}
                log(f"hnsw: built in {r['hnsw']['build_s']:.1f} s")
                for ef in (64, 128, 256):
                    index.hnsw.efSearch = ef
                    res = _time_index(index, queries, truth, picks, nq, k)
                    r["hnsw"]["by_ef"][ef] = res
                    log(f"  ef {ef}: near R@10 {res['near']['recall10']:.3f} (match {res['near']['match_found']:.2f}) p50 {res['near']['p50_ms']:.2f} ms | "
                        f"uniform R@10 {res['uniform']['recall10']:.3f} p50 {res['uniform']['p50_ms']:.2f} ms")
                del index
            else:
                r["hnsw"] = {"skipped": f"above --hnsw-max {args.hnsw_max}"}
        out[str(n) if args.data == "uniform" else f"{args.data}/{n}"] = r
        del emb, emb_t
    out["faiss_version"] = faiss.__version__ if not args.no_faiss else None
    return out


# -------------------------------------------------------------------------------------------------
def make_clips(folder: Path, n: int, seconds: int = 5, fps: int = 30, w: int = 320, h: int = 240) -> None:
    """Natural-looking h264 clips: moving gradients and a disc, light noise, keyframe every second."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(n):
        g = np.random.default_rng(c)
        col = g.uniform(40, 215, 3)
        with av.open(str(folder / f"clip{c:03d}.mp4"), "w") as out:
            s = out.add_stream("libx264", rate=Fraction(fps))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = {"g": str(fps), "preset": "veryfast", "threads": "1"}
            for t in range(seconds * fps):
                ph = t / fps
                img = np.empty((h, w, 3), np.float32)
                for ch in range(3):
                    img[..., ch] = col[ch] + 40 * np.sin(xx / 40 + ph * (ch + 1)) * np.cos(yy / 50 - ph)
                cx, cy = (w / 2 + 100 * np.sin(ph + c)), (h / 2 + 60 * np.cos(ph * 1.3))
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < 30 ** 2] = (250, 240, 30)
                img += g.normal(0, 3, img.shape)
                frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
                for p in s.encode(frame):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)


def bench_build(args, tmp: Path) -> dict:
    out = {}
    clips = tmp / "clips"
    t = time.perf_counter()
    make_clips(clips, args.build_videos)
    log(f"generated {args.build_videos} clips in {time.perf_counter() - t:.1f} s")
    ck = make_ckpt(tmp / "b32-vop-f.safetensors", "vop-f", "ViT-B/32", 0)
    for workers in args.build_workers:
        r = build_index(clips, ck, tmp / f"b32-index-{workers}", batch_size=8, num_workers=workers, progress=False)
        out[f"ViT-B-32/vop-f/224px/12f/workers{workers}"] = {"videos": r.encoded, "seconds": r.seconds,
                                                             "videos_per_s": r.videos_per_second}
        log(f"build ViT-B/32 vop-f, 12 frames 224 px, {workers} workers: {r.videos_per_second:.2f} videos/s "
            f"({r.encoded} in {r.seconds:.1f} s, model load included)")
    from vop.data import generate_world

    world = tmp / "world"
    generate_world(world, size="small")
    ck = make_ckpt(tmp / "tiny-vop-fc.safetensors", "vop-fc", "tiny", 0, frames=12)
    for workers in args.build_workers:
        r = build_index(world / "captions.jsonl", ck, tmp / f"tiny-index-{workers}", split="all", batch_size=32,
                        num_workers=workers, progress=False)
        out[f"tiny/vop-fc/32px/12f/synthetic-small/workers{workers}"] = {"videos": r.encoded, "seconds": r.seconds,
                                                                         "videos_per_s": r.videos_per_second}
        log(f"build tiny vop-fc on the synthetic world ({r.encoded} videos, 64x64), {workers} workers: "
            f"{r.videos_per_second:.1f} videos/s")
    return out


# -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def bench_load(args, tmp: Path) -> dict:
    import httpx

    from vop.data import generate_world, get_dataset

    world = tmp / "load-world"
    generate_world(world, size="smoke")
    ia, ib = tmp / "load-A", tmp / "load-B"
    build_index(world / "captions.jsonl", make_ckpt(tmp / "la.safetensors", "vop-fc", "tiny", 1, 4), ia, image_size=32,
                progress=False)
    build_index(world / "captions.jsonl", make_ckpt(tmp / "lb.safetensors", "vop-f", "tiny", 2, 4), ib, image_size=32,
                progress=False)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server_log = open(tmp / "serve.log", "wb")  # a file, not a pipe: an unread pipe would block the server's logging
    proc = subprocess.Popen([sys.executable, "-m", "vop.cli.main", "serve", f"A={ia}", f"B={ib}", "--port", str(port)],
                            stdout=server_log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/api/indexes", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("vop serve did not start: " + (tmp / "serve.log").read_text()[-2000:])
            time.sleep(0.2)
        caps = get_dataset("collection", world, "all", frames=4, size=32).captions
        queries = [(f"{caps[i % len(caps)]} {i}", "AB"[i % 2]) for i in range(args.load_queries)]
        lat, codes = [], []

        def one(client, q, ix):
            t = time.perf_counter()
            r = client.get("/api/search", params={"q": q, "k": 10, "index": ix})
            lat.append(time.perf_counter() - t)
            codes.append(r.status_code)

        t0 = time.perf_counter()
        with httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=args.concurrency)) as client:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda a: one(client, *a), queries))
            wall = time.perf_counter() - t0
            bad = {"empty": "/api/search?q=", "10k chars": "/api/search?q=" + "a" * 10_000,
                   "invalid utf-8": "/api/search?q=%FF%FE", "unknown index": "/api/search?q=x&index=nope",
                   "traversal": "/video/A/..%2F..%2F..%2Fetc%2Fpasswd", "bad row": "/thumb/A/999999"}
            bad_codes = {name: client.get(path).status_code for name, path in bad.items()}
        res = {"queries": len(queries), "concurrency": args.concurrency, "errors": sum(c != 200 for c in codes),
               "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "throughput_qps": len(queries) / wall,
               "bad_requests": bad_codes, "backbone": "tiny", "index_videos": 36}
        log(f"load: {len(queries)} queries at concurrency {args.concurrency}: {res['errors']} errors, p50 {res['p50_ms']:.1f} ms, "
            f"p99 {res['p99_ms']:.1f} ms, {res['throughput_qps']:.0f} queries/s; bad requests -> {bad_codes}")
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        server_log.close()


# -------------------------------------------------------------------------------------------------
_MEM_CHILD = r"""
import json, sys, gc
sys.path.insert(0, {src!r})
import torch
from pathlib import Path
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
mode, specs = sys.argv[1], sys.argv[2:]
import vop
from vop.retrieval import SearchService, Searcher
from vop.retrieval.service import Loaded
base = rss()
if mode == "shared":
    svc = SearchService.load(specs)
else:  # each prompt set with its own backbone (what a naive server does)
    svc = SearchService([Loaded(s.split("=")[0], Searcher.open(s.split("=")[1])) for s in specs])
for n in svc.indexes:
    svc.search("a dog runs on the beach", 5, n)
gc.collect()
print(json.dumps({{"rss_mb": rss(), "import_rss_mb": base, "backbones": len({{id(m.clip) for m in svc.models()}})}}))
"""


def bench_memory(args, tmp: Path) -> dict:
    from vop.backbone.config import get_arch

    out = {}
    specs = []
    for name, seed in (("A", 1), ("B", 2)):
        ck = make_ckpt(tmp / f"mem-{name}.safetensors", "vop-f", "ViT-B/32", seed)
        info = checkpoint_info(ck)  # records the backbone fingerprint the prompts were made on
        emb = random_unit(args.memory_videos, get_arch("ViT-B-32").embed_dim, seed)
        entries = [{"id": f"v{i}.mp4", "path": f"/nowhere/v{i}.mp4"} for i in range(len(emb))]
        write_index(tmp / f"mem-{name}", emb, entries, {"model": info, "settings": {"frames": 12, "image_size": 224,
                                                                                    "max_words": 32}})
        specs.append(f"{name}={tmp / f'mem-{name}'}")
    child = _MEM_CHILD.format(src=str(ROOT / "src"))
    for label, mode, sp in (("one prompt set", "shared", specs[:1]), ("two prompt sets, shared backbone", "shared", specs),
                            ("two prompt sets, separate backbones", "separate", specs)):
        p = subprocess.run([sys.executable, "-c", child, mode, *sp], capture_output=True, text=True, timeout=600)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        out[label] = json.loads(p.stdout.strip().splitlines()[-1])
        log(f"memory, {label}: RSS {out[label]['rss_mb']:.0f} MB ({out[label]['backbones']} backbone(s))")
    out["videos_per_index"] = args.memory_videos
    return out


# -------------------------------------------------------------------------------------------------
def _milvus_index(path: Path, uri: str, emb: np.ndarray) -> float:
    """An index in a Milvus store over ``emb`` (FLAT: exact), as ``vop index --store`` writes it; seconds taken."""
    from vop.retrieval.milvus import open_for_write, write_milvus
    from vop.retrieval.store import AnnChoice, StoreSpec

    entries = [{"id": f"v{i}.mp4", "path": f"/videos/v{i}.mp4", "size": 1_000_000, "mtime_ns": i, "duration": 10.0}
               for i in range(len(emb))]
    meta = {"model": {"checkpoint_sha256": "0" * 64}, "settings": {},
            "scoring": {"kind": "cosine", "row_shape": [emb.shape[1]], "ann": True}}
    t = time.perf_counter()
    store = open_for_write(StoreSpec.parse(uri), path, None, False)
    try:
        write_milvus(store, path, path, entries, list(emb), {e["id"] for e in entries}, set(), meta, None,
                     AnnChoice("exact").resolve(len(emb), emb.shape[1]), rebuild=False, fetch_old=lambda ids: None)
    finally:
        store.close()
    return time.perf_counter() - t


def _time_store(ix, queries, truth, picks, nq, k, ref_scores=None, **params):
    """One query at a time through ``VideoIndex.search``: latency, recall@10 against exact, per query kind."""
    res = {}
    for kind, q in queries.items():
        lat, rows, scores = [], [], []
        for i in range(nq):
            t = time.perf_counter()
            s, rr = ix.search(q[i:i + 1], k, **params)
            lat.append(time.perf_counter() - t)
            rows.append(rr[0])
            scores.append(s[0])
        rows = np.stack(rows)
        res[kind] = {"recall10": _recall(truth[kind], rows), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
        if ref_scores is not None:
            res[kind]["max_score_diff"] = float(np.abs(np.stack(scores) - ref_scores[kind]).max())
            res[kind]["same_rows"] = bool(np.array_equal(rows, truth[kind]))
        if kind == "near":
            res[kind]["match_found"] = float(np.mean([p in rr for p, rr in zip(picks, rows)]))
    return res


def bench_stores(args, tmp: Path) -> dict:
    """The faiss store and a Milvus Lite file, same embeddings, through VideoIndex (the vop search path)."""
    import milvus_lite
    import pymilvus

    from vop.retrieval import VideoIndex
    from vop.retrieval.milvus import milvus_index
    from vop.retrieval.store import AnnChoice
    from vop.scoring import CosineScoring

    cosine = CosineScoring()
    d, k, nq = args.dim, 10, args.search_queries
    out: dict = {"pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__, "data": args.data,
                 "torch_threads": torch.get_num_threads()}
    for n in args.sizes:
        log(f"--- stores: {n:,} x {d}, {args.data} ---")
        emb = random_unit(n, d, seed=n) if args.data == "uniform" else clustered_unit(n, d, seed=n)
        g = np.random.default_rng(1)
        picks = g.integers(0, n, nq)
        noise = g.standard_normal((nq, d), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        near = emb[picks] + 1.0 * noise
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        queries = {"near": near.astype(np.float32), "uniform": random_unit(nq, d, seed=7)}
        entries = [{"id": f"v{i}.mp4", "path": f"/videos/v{i}.mp4"} for i in range(n)]
        r: dict = {"n": n, "dim": d, "queries": nq}
        t = time.perf_counter()
        write_index(tmp / f"faiss-{n}", emb, entries, {"model": {}, "settings": {}})
        r["faiss_write_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ref = VideoIndex.open(tmp / f"faiss-{n}")
        r["faiss_open_s"] = time.perf_counter() - t
        truth, ref_scores, lat = {}, {}, []
        for kind, q in queries.items():
            rows, scores = [], []
            for i in range(nq):
                t = time.perf_counter()
                s, rr = ref.search(q[i:i + 1], k)
                lat.append(time.perf_counter() - t)
                rows.append(rr[0])
                scores.append(s[0])
            truth[kind], ref_scores[kind] = np.stack(rows), np.stack(scores)
        r["faiss_exact"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
        log(f"faiss store, exact: p50 {pct(lat, 50):.2f} ms  p99 {pct(lat, 99):.2f} ms")
        del ref
        path, uri = tmp / f"milvus-{n}", f"milvus://{tmp / 'stores.db'}/bench_{n}"
        secs = _milvus_index(path, uri, emb)
        r["milvus_write_s"], r["milvus_write_videos_per_s"] = secs, n / secs
        log(f"milvus lite: written in {secs:.1f} s ({n / secs:,.0f} videos/s)")
        for verify in (True, False):
            t = time.perf_counter()
            ix = VideoIndex.open(path, verify=verify)
            r[f"milvus_open_s/verify={verify}"] = time.perf_counter() - t
            if not verify:
                break
            ix.close()
        log(f"  open: {r['milvus_open_s/verify=True']:.2f} s verified (keys compared), {r['milvus_open_s/verify=False']:.2f} s not")
        try:
            res = r["milvus_flat"] = _time_store(ix, queries, truth, picks, nq, k, ref_scores)
            log(f"  FLAT: near R@10 {res['near']['recall10']:.3f} p50 {res['near']['p50_ms']:.2f} ms p99 {res['near']['p99_ms']:.2f} ms, "
                f"max |score diff| {max(res[x]['max_score_diff'] for x in res):.2e}")
            resolved = AnnChoice("ivf").resolve(n, d)
            t = time.perf_counter()
            ix.store.set_index(milvus_index(resolved))
            ix.store.search(cosine, torch.from_numpy(queries["near"][:1]), k)  # the first search builds what is left
            ix.store.index = {"kind": "ivf", "params": dict(resolved.params)}
            r["milvus_ivf"] = {"build_s": time.perf_counter() - t, "nlist": resolved.params["nlist"], "by_nprobe": {}}
            log(f"  IVF_FLAT nlist {resolved.params['nlist']}: built in {r['milvus_ivf']['build_s']:.1f} s")
            for nprobe in (8, 32, 128):
                res = r["milvus_ivf"]["by_nprobe"][nprobe] = _time_store(ix, queries, truth, picks, nq, k, nprobe=nprobe)
                log(f"    nprobe {nprobe}: near R@10 {res['near']['recall10']:.3f} (match {res['near']['match_found']:.2f}) "
                    f"p50 {res['near']['p50_ms']:.2f} ms | uniform R@10 {res['uniform']['recall10']:.3f} p50 {res['uniform']['p50_ms']:.2f} ms")
            if n <= args.milvus_hnsw_max:
                resolved = AnnChoice("hnsw").resolve(n, d)
                t = time.perf_counter()
                ix.store.set_index(milvus_index(resolved))
                ix.store.search(cosine, torch.from_numpy(queries["near"][:1]), k)
                ix.store.index = {"kind": "hnsw", "params": dict(resolved.params)}
                r["milvus_hnsw"] = {"build_s": time.perf_counter() - t, "M": resolved.params["M"], "by_ef": {}}
                log(f"  HNSW M {resolved.params['M']}: built in {r['milvus_hnsw']['build_s']:.1f} s")
                for ef in (64, 128, 256):
                    res = r["milvus_hnsw"]["by_ef"][ef] = _time_store(ix, queries, truth, picks, nq, k, ef_search=ef)
                    log(f"    ef {ef}: near R@10 {res['near']['recall10']:.3f} p50 {res['near']['p50_ms']:.2f} ms | "
                        f"uniform R@10 {res['uniform']['recall10']:.3f} p50 {res['uniform']['p50_ms']:.2f} ms")
            else:
                r["milvus_hnsw"] = {"skipped": f"above --milvus-hnsw-max {args.milvus_hnsw_max}"}
        finally:
            ix.close()
        out[str(n) if args.data == "uniform" else f"{args.data}/{n}"] = r
        del emb
    return out


# -------------------------------------------------------------------------------------------------
def unit_chunks(n, d, seed, data="uniform", clusters=1000):
    """The rows of ``random_unit(n, d, seed)`` / ``clustered_unit(n, d, seed)``, bit for bit, as 100,000-row
    blocks: the same vectors at the same size, never all in memory."""
    g = np.random.default_rng(seed)
    centres = random_unit(clusters, d, seed + 1) if data == "clustered" else None
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        if centres is None:
            x = g.standard_normal((m, d), dtype=np.float32)
        else:
            x = centres[g.integers(0, clusters, m)] + (0.75 / np.sqrt(d)) * g.standard_normal((m, d), dtype=np.float32)
        yield s, x / np.linalg.norm(x, axis=1, keepdims=True)


def write_npy_chunks(path: Path, n: int, d: int, chunks) -> np.ndarray:
    """A float32 (n, d) ``.npy`` written block by block; returned memory-mapped (read-only)."""
    from numpy.lib import format as npy

    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        for _, x in chunks:
            f.write(np.ascontiguousarray(x, np.float32).tobytes())
    return np.load(path, mmap_mode="r")


class LazyEntries:
    """The video list of a synthetic index (``v<i>``, ``/videos/v<i>.mp4``), made entry by entry when read: what
    ``write_index`` needs from a list, without 10M dicts in the writing process (the reading one has them)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"id": f"v{i}", "path": f"/videos/v{i}.mp4"}

    def __iter__(self):
        return (self[i] for i in range(self.n))


def _reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak resident set) for the next phase
    except OSError:
        pass


def _mem():
    st = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            st[key] = int(line.split()[1]) / 1024
    return {"peak_rss_mb": st.get("VmHWM"), "rss_mb": st.get("VmRSS"), "rss_anon_mb": st.get("RssAnon"),
            "rss_file_mb": st.get("RssFile")}


def _exact_truth(emb, queries, k, step=1 << 18):
    """Exact top-k of every query by a chunked scan of ``emb`` (memory-mapped: one chunk resident at a time)."""
    from vop.retrieval.ann import iter_rows
    from vop.retrieval.index import exact_search

    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for s0, part in iter_rows(emb, step):
        sc, rw = exact_search(torch.from_numpy(part), q, k)
        best_s, best_r = np.concatenate([best_s, sc], 1), np.concatenate([best_r, rw + s0], 1)
        order = np.lexsort((best_r, -best_s.astype(np.float64)), axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
    return best_s, best_r


def bench_scale(args, tmp: Path) -> dict:
    """IVF-PQ at millions of videos on one machine, through the library's path: the synthetic vectors written
    block by block to a .npy, ``write_index`` with the parameters ``--ann auto`` resolves for that size (what
    ``vop index`` writes: chunked FAISS build, float16 re-rank copy), ``VideoIndex.open`` (memory-mapped rows)
    and ``VideoIndex.search`` one query at a time over an nprobe x rerank grid; recall@10 against an exact
    chunked scan; build time, peak memory per phase, file sizes."""
    import faiss

    from vop.retrieval import VideoIndex
    from vop.retrieval.store import AnnChoice

    faiss.omp_set_num_threads(min(2, os.cpu_count() or 1))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    d, k, nq = args.dim, 10, args.scale_queries
    work = Path(args.scale_tmp) if args.scale_tmp else tmp
    work.mkdir(parents=True, exist_ok=True)
    out = {"faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads()}
    for n in args.scale_sizes:
        for data in args.scale_data:
            key = f"{data}/{n}"
            log(f"--- scale: {n:,} x {d}, {data} --- (free: {_free_gb():.1f} GB available)")
            r: dict = {"n": n, "dim": d, "data": data, "queries": nq}
            src, ixp = work / f"src-{data}-{n}.npy", work / f"index-{data}-{n}"
            if args.scale_index:  # an index this section built and kept (--scale-keep): measure it again
                ixp = Path(args.scale_index)
                meta = json.loads((ixp / "index.json").read_text())
                emb = np.load(ixp / meta["files"]["embeddings"], mmap_mode="r")
                assert emb.shape == (n, d), (emb.shape, n, d)
                r["reused"] = str(ixp)
                r["params"] = meta["faiss"]["params"]
                r["files_mb"] = {name: (ixp / name).stat().st_size / 2**20 for name in meta["files"].values()}
                key += "/again"
            _reset_peak()
            t = time.perf_counter()
            if not args.scale_index:
                emb = write_npy_chunks(src, n, d, unit_chunks(n, d, seed=n, data=data))
            if not args.scale_index:
                r["generate"] = {"s": time.perf_counter() - t, **_mem()}
                log(f"generated in {r['generate']['s']:.0f} s, peak RSS {r['generate']['peak_rss_mb']:.0f} MB")
                resolved = AnnChoice(args.scale_ann, {k_: v for k_, v in (args.scale_params or {}).items()}).resolve(n, d)
                r["ann"] = {"choice": args.scale_ann, "kind": resolved.kind, "params": resolved.params, "why": resolved.why}
                log(f"ann: {resolved.kind} {resolved.params} ({resolved.why})")
                _reset_peak()
                t = time.perf_counter()
                full = write_index(ixp, emb, LazyEntries(n), {"model": {}, "settings": {},
                                                              "faiss": {"kind": resolved.kind, "params": resolved.params}})
                r["build"] = {"s": time.perf_counter() - t, **_mem(), "params": full["faiss"]["params"] if full["faiss"] else None}
                r["files_mb"] = {name: (ixp / name).stat().st_size / 2**20 for name in full["files"].values()}
                log(f"write_index (embeddings copy, video list, FAISS build, rerank copy, checksums) in {r['build']['s']:.0f} s, "
                    f"peak RSS {r['build']['peak_rss_mb']:.0f} MB; files {r['files_mb']}")
            g = np.random.default_rng(1)
            picks = g.integers(0, n, nq)
            noise = g.standard_normal((nq, d), dtype=np.float32)
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            near = np.asarray(emb[picks]) + 1.0 * noise
            near /= np.linalg.norm(near, axis=1, keepdims=True)
            queries = {"near": near.astype(np.float32), "uniform": random_unit(nq, d, seed=7)}
            t = time.perf_counter()
            truth = {kind: _exact_truth(emb, q, k)[1] for kind, q in queries.items()}
            r["exact_scan_s"] = time.perf_counter() - t
            log(f"exact top-10 of {2 * nq} queries by a chunked scan: {r['exact_scan_s']:.0f} s")
            del emb
            if not args.scale_index:
                src.unlink()
            # queries one at a time on one thread each (faiss, torch): a server answers one query per core; on a busy
            # machine a second thread woken for a 1 x 512 product waits for a time slice (~16 ms measured here)
            faiss.omp_set_num_threads(1)
            torch.set_num_threads(1)
            _reset_peak()
            t = time.perf_counter()
            ix = VideoIndex.open(ixp, verify=False)
            ix.search(queries["near"][:1], k)  # loads the FAISS index, maps the rerank copy
            r["open"] = {"s": time.perf_counter() - t, **_mem()}
            log(f"open + first query: {r['open']['s']:.1f} s, RSS {r['open']['rss_mb']:.0f} MB")
            for i in range(nq):  # warm: the re-rank pages these queries touch, as a serving process would have them
                ix.search(queries["near"][i:i + 1], k)
            r["grid"] = {}
            for nprobe in args.scale_nprobe:
                for rerank in args.scale_rerank:
                    res = _time_store(ix, queries, truth, picks, nq, k, nprobe=nprobe, rerank=rerank)
                    cell = r["grid"][f"nprobe={nprobe}/rerank={rerank}"] = {"nprobe": nprobe, "rerank": rerank,
                                                                            "candidates": k * rerank, **res}
                    if args.scale_again:  # the same queries again: their re-rank rows are now in the page cache
                        again = _time_store(ix, queries, truth, picks, nq, k, nprobe=nprobe, rerank=rerank)
                        cell["again"] = {kind: {"p50_ms": v["p50_ms"], "p99_ms": v["p99_ms"]} for kind, v in again.items()}
                        fi = ix.store.faiss_index(nprobe=nprobe)
                        lat = []
                        for i in range(nq):  # the IVF-PQ alone (the compressed codes in memory): the candidates
                            t0 = time.perf_counter()
                            fi.search(queries["near"][i:i + 1], k * rerank)
                            lat.append(time.perf_counter() - t0)
                        cell["ivfpq_only"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
                        log(f"    again: near p50 {again['near']['p50_ms']:.2f} p99 {again['near']['p99_ms']:.2f} ms | uniform p50 "
                            f"{again['uniform']['p50_ms']:.2f} ms; IVF-PQ alone p50 {cell['ivfpq_only']['p50_ms']:.2f} ms")
                    log(f"  nprobe {nprobe:4d} rerank {rerank:3d} ({k * rerank:4d} cand.): near R@10 {res['near']['recall10']:.3f} "
                        f"p50 {res['near']['p50_ms']:.2f} p99 {res['near']['p99_ms']:.2f} ms | uniform R@10 "
                        f"{res['uniform']['recall10']:.3f} p50 {res['uniform']['p50_ms']:.2f} p99 {res['uniform']['p99_ms']:.2f} ms")
            r["search_mem"] = _mem()
            r["search_threads"] = {"faiss": 1, "torch": 1}
            r["loadavg"] = list(os.getloadavg())
            faiss.omp_set_num_threads(min(2, os.cpu_count() or 1))
            torch.set_num_threads(min(2, os.cpu_count() or 1))
            log(f"search phase: peak RSS {r['search_mem']['peak_rss_mb']:.0f} MB (anon {r['search_mem']['rss_anon_mb']:.0f} MB)")
            ix.close()
            del ix
            if not (args.scale_keep or args.scale_index):
                import shutil

                shutil.rmtree(ixp, ignore_errors=True)
            out[key] = r
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                prev = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
                prev.setdefault("scale", {}).update(out)
                Path(args.json).write_text(json.dumps(prev, indent=2))
    return out


def _free_gb():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# -------------------------------------------------------------------------------------------------
def bench_pairwise(args, tmp: Path) -> dict:
    """cma's query score at ``--pairwise-videos`` videos: synthetic raw frame embeddings (F x D per video: a video's
    direction in one of 1000 clusters plus per-frame variation, norm 10; queries of norm 8), written by
    ``write_index`` as a qscore index and searched through ``VideoIndex.search``: exact (every video scored) against
    candidates-then-rescore (``candidates`` C: mean-pooled frame vectors, exact cosine top-C, then the query
    score on those C), recall@10 against exact and latency, one query at a time."""
    from types import SimpleNamespace

    from vop.methods.cma import QScore
    from vop.retrieval import VideoIndex

    n, f, d, nq, k = args.pairwise_videos, args.pairwise_frames, args.dim, args.search_queries, 10
    tau = 5.0  # CMAOptions.tau
    g = np.random.default_rng(3)
    log(f"--- pairwise: {n:,} videos x {f} frames x {d}, cma query score (tau {tau}) ---")
    torch.set_num_threads(1)  # one query at a time on one thread (a second thread waits for a time slice on a busy machine)
    rows = np.empty((n, f, d), np.float32)
    scene = np.empty((n, d), np.float32)
    for s00, bases in unit_chunks(n, d, seed=n, data="clustered"):
        for j in range(0, len(bases), 4096):  # blocks of 4,096 videos: 100 MB of frames at a time
            # two scenes per video (a cut at a random frame): a frame is the video's direction, its scene's offset
            # (norm 0.8) and noise (norm 0.3); mean pooling blurs the scenes, the query score weighs them by the text
            base, s0 = bases[j:j + 4096], s00 + j
            m = len(base)
            sc = (0.8 / np.sqrt(d)) * g.standard_normal((m, 2, d), dtype=np.float32)
            cut = g.integers(1, f, m)
            which = (np.arange(f)[None, :] >= cut[:, None]).astype(np.int64)
            x = (base[:, None, :] + np.take_along_axis(sc, which[:, :, None], 1)
                 + (0.3 / np.sqrt(d)) * g.standard_normal((m, f, d), dtype=np.float32))
            rows[s0:s0 + m] = 10.0 * x / np.linalg.norm(x, axis=2, keepdims=True)
            scene[s0:s0 + m] = base + sc[:, 1]
    picks = g.integers(0, n, nq)
    noise = g.standard_normal((nq, d), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = scene[picks]  # a query describing the second scene of a video
    near = near / np.linalg.norm(near, axis=1, keepdims=True) + 1.0 * noise
    del scene
    queries = {"near": 8.0 * near / np.linalg.norm(near, axis=1, keepdims=True),
               "uniform": 8.0 * random_unit(nq, d, seed=7)}
    ixp = tmp / "pairwise"
    t = time.perf_counter()
    write_index(ixp, rows, LazyEntries(n), {"model": {"method": "cma"}, "settings": {"frames": f},
                                            "scoring": {"kind": "qscore", "row_shape": [f, d], "ann": False}})
    r: dict = {"n": n, "frames": f, "dim": d, "queries": nq, "tau": tau, "write_s": time.perf_counter() - t,
               "torch_threads": torch.get_num_threads(),
               "data": "synthetic raw frame embeddings: clustered video directions, two scenes per video, norm 10"}
    del rows
    ix = VideoIndex.open(ixp, verify=False)
    model = SimpleNamespace(scoring=QScore(tau), name="cma")
    t = time.perf_counter()
    ix.search(queries["near"][:1], k, model=model)  # the gallery cache (F x F Gram matrices) is computed once
    ix.search(queries["near"][:1], k, model=model, candidates=100)  # and the pooled vectors
    r["first_query_s"] = time.perf_counter() - t
    truth = {}
    t = time.perf_counter()
    for kind, q in queries.items():
        truth[kind] = ix.search(q, k, model=model)[1]  # exact, all queries at once (blocks of 256)
    r["exact_batch_s"] = time.perf_counter() - t
    lat = []
    for i in range(min(nq, 30)):
        t = time.perf_counter()
        ix.search(queries["near"][i:i + 1], k, model=model)
        lat.append(time.perf_counter() - t)
    r["exact"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "timed_queries": len(lat)}
    log(f"exact pairwise, one query: p50 {r['exact']['p50_ms']:.1f} ms p99 {r['exact']['p99_ms']:.1f} ms")
    r["by_candidates"] = {}
    for c in args.pairwise_candidates:
        res = {}
        for kind, q in queries.items():
            lat, got = [], []
            for i in range(nq):
                t = time.perf_counter()
                _, rr = ix.search(q[i:i + 1], k, model=model, candidates=c)
                lat.append(time.perf_counter() - t)
                got.append(rr[0])
            res[kind] = {"recall10": _recall(truth[kind], np.stack(got)), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
        r["by_candidates"][c] = res
        log(f"  C {c:5d}: near R@10 {res['near']['recall10']:.3f} p50 {res['near']['p50_ms']:.1f} ms p99 "
            f"{res['near']['p99_ms']:.1f} ms | uniform R@10 {res['uniform']['recall10']:.3f} p50 {res['uniform']['p50_ms']:.1f} ms")
    r["rss_mb"] = _mem()
    r["loadavg"] = list(os.getloadavg())
    ix.close()
    shutil_rm(ixp)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return r


def shutil_rm(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


_SERVE_WAIT = 300


def _serve(tmp: Path, specs: list[str], extra: list[str], label: str):
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logf = open(tmp / f"serve-{label}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vop.cli.main", "serve", *specs, "--port", str(port), *extra],
                            stdout=logf, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _SERVE_WAIT
    while True:
        try:
            if httpx.get(base + "/api/indexes", timeout=2).status_code == 200:
                return proc, base, logf
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("vop serve did not start: " + (tmp / f"serve-{label}.log").read_text()[-2000:])
        time.sleep(0.5)


def _stop(proc, logf):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    logf.close()


def bench_latency(args, tmp: Path) -> dict:
    """Query latency end to end through ``vop serve`` (HTTP on 127.0.0.1, one request at a time) on a
    ``--latency-videos`` index: ViT-B/32 + VoP-F prompts (random weights: the cost does not depend on the values),
    synthetic clustered 512-d embeddings written by ``write_index`` with the approximate index ``--ann auto`` picks
    for that size (IVF-Flat at 1M); fp32 text tower vs ``--text-int8``, distinct queries (the text tower runs) vs
    repeated ones (the query cache answers). The ranking change of int8: overlap@10 with fp32 and R@1 on the demo's
    queries (the synthetic world's test captions, ``small``) with the shipped tiny CLIP, zero-shot (what ``vop demo``
    starts from), indexed by ``build_index`` at the demo's 64 px, 8 frames."""
    import httpx

    from vop.data import generate_world, get_dataset
    from vop.retrieval import Searcher
    from vop.retrieval.search import quantize_text_tower
    from vop.retrieval.store import AnnChoice

    out: dict = {}
    # 1. the ranking change, on the demo's queries
    world = tmp / "lat-world"
    t = time.perf_counter()
    generate_world(world, size=args.latency_world)
    ck = vop.save_checkpoint(vop.create_model("zeroshot", "tiny-clip", frames=8), tmp / "zs.safetensors",
                             extra={"backbone": "tiny-clip"})
    build_index(world / "captions.jsonl", ck, tmp / "lat-demo", split="test", image_size=64, frames=8, progress=False)
    caps = get_dataset("collection", world, "test", frames=8, size=64)
    log(f"demo index: {time.perf_counter() - t:.0f} s")
    texts = list(caps.captions)
    owner = _caption_owners(caps)
    res = {}
    for label, int8 in (("fp32", False), ("int8", True)):
        s = Searcher.open(tmp / "lat-demo", text_int8=int8)
        hits = s.search(texts, 10)
        res[label] = [[h["id"] for h in hh] for hh in hits]
        if int8:
            res["int8_layers"] = sum(1 for m in s.model.clip.transformer.modules() if "quantized" in type(m).__module__)
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(res["fp32"], res["int8"])]
    top1 = {lab: float(np.mean([ids[0] == o for ids, o in zip(res[lab], owner)])) if owner else None for lab in ("fp32", "int8")}
    out["ranking"] = {"world": args.latency_world, "queries": len(texts), "gallery": len(set(sum(res["fp32"], []))),
                      "model": "zeroshot on tiny-clip (the shipped tiny CLIP)", "overlap10_mean": float(np.mean(overlap)),
                      "overlap10_min": float(np.min(overlap)), "same_top1": float(np.mean([a[0] == b[0] for a, b in zip(res["fp32"], res["int8"])])),
                      "identical_top10": float(np.mean([a == b for a, b in zip(res["fp32"], res["int8"])])),
                      "r1": top1, "int8_layers": res.get("int8_layers")}
    log(f"int8 text tower on the demo's {len(texts)} queries: overlap@10 {np.mean(overlap):.3f} (min {np.min(overlap):.1f}), "
        f"same top-1 {out['ranking']['same_top1']:.3f}, R@1 fp32 {top1['fp32']} int8 {top1['int8']}")
    # 2. the text tower alone, ViT-B/32, in this process
    from vop.retrieval.search import encode_queries

    enc = {}
    for label in ("fp32", "int8"):
        m = vop.create_model("vop-f", "ViT-B/32", frames=12).eval()
        if label == "int8":
            quantize_text_tower(m)
        tok = m.tokenizer(32)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            lat = []
            for i in range(args.encode_queries + 3):
                t = time.perf_counter()
                encode_queries(m, [f"a person number {i} slices a red tomato on a wooden board"], tokenizer=tok)
                if i >= 3:
                    lat.append(time.perf_counter() - t)
            enc[f"{label}/threads{threads}"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
            log(f"encode ViT-B/32 text, {label}, {threads} thread(s): p50 {pct(lat, 50):.1f} ms")
        del m
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out["encode_vitb32"] = enc
    # 3. end to end through vop serve, on a 1M-video index
    n, d = args.latency_videos, 512
    ckb = make_ckpt(tmp / "lat-b32.safetensors", "vop-f", "ViT-B/32", 1)
    info = checkpoint_info(ckb)
    resolved = AnnChoice("auto").resolve(n, d)
    t = time.perf_counter()
    emb = clustered_unit(n, d, seed=n)
    write_index(tmp / "lat-1m", emb, LazyEntries(n), {"model": info, "settings": {"frames": 12, "image_size": 224, "max_words": 32},
                                                       "faiss": None if resolved.exact else {"kind": resolved.kind, "params": resolved.params},
                                                       "ann": AnnChoice("auto").record(resolved)})
    del emb
    out["index"] = {"videos": n, "ann": resolved.kind, "params": resolved.params, "why": resolved.why,
                    "write_s": time.perf_counter() - t, "model": "vop-f on ViT-B/32 (random weights)"}
    log(f"1M index ({resolved.kind} {resolved.params}) written in {out['index']['write_s']:.0f} s")
    qs = [f"a person number {i} slices a red tomato on a wooden board" for i in range(args.latency_queries)]
    for label, extra in (("fp32", []), ("int8", ["--text-int8"])):
        for threads in args.latency_threads:
            proc, base, logf = _serve(tmp, [f"A={tmp / 'lat-1m'}"], ["--no-verify", "--threads", str(threads), *extra],
                                      f"{label}-{threads}")
            try:
                r = {}
                with httpx.Client(base_url=base, timeout=120) as client:
                    client.get("/api/search", params={"q": "warm up", "k": 10})
                    for kind, batch in (("distinct", qs), ("repeated", qs)):  # the second pass: every query cached
                        lat, took = [], []
                        for q in batch:
                            t = time.perf_counter()
                            resp = client.get("/api/search", params={"q": q, "k": 10})
                            lat.append(time.perf_counter() - t)
                            took.append(resp.json()["took_ms"] / 1000)
                            assert resp.status_code == 200
                        r[kind] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "server_p50_ms": pct(took, 50),
                                   "queries": len(batch)}
                out[f"serve/{label}/threads{threads}"] = r
                log(f"vop serve {label}, --threads {threads}: distinct p50 {r['distinct']['p50_ms']:.1f} ms p99 "
                    f"{r['distinct']['p99_ms']:.1f} ms (server {r['distinct']['server_p50_ms']:.1f}) | repeated (cached) p50 "
                    f"{r['repeated']['p50_ms']:.1f} ms (server {r['repeated']['server_p50_ms']:.1f})")
            finally:
                _stop(proc, logf)
    out["loadavg"] = list(os.getloadavg())
    return out


def _caption_owners(ds) -> list[str]:
    """The id of the video each caption of ``ds`` describes."""
    return [ds.videos[int(i)] for i in ds.text_to_video]


# -------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--data", choices=["uniform", "clustered"], default="uniform",
                    help="stored vectors: uniform on the sphere (the worst case for FAISS) or in 1000 clusters")
    ap.add_argument("--search-queries", type=int, default=100)
    ap.add_argument("--encode-queries", type=int, default=30)
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest size with an HNSW build (slow on 2 cores)")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--build-videos", type=int, default=24)
    ap.add_argument("--build-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--load-queries", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--memory-videos", type=int, default=10_000)
    ap.add_argument("--milvus-hnsw-max", type=int, default=10_000, help="largest size with a Milvus HNSW build")
    ap.add_argument("--scale-sizes", type=int, nargs="+", default=[10_000_000], help="scale: collection sizes")
    ap.add_argument("--scale-data", nargs="+", default=["clustered"], choices=["uniform", "clustered"])
    ap.add_argument("--scale-queries", type=int, default=200)
    ap.add_argument("--scale-ann", default="auto", help="scale: --ann (auto picks IVF-PQ from 4M videos)")
    ap.add_argument("--scale-params", type=json.loads, default=None, help='scale: explicit parameters, JSON ({"nlist": 1024})')
    ap.add_argument("--scale-nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--scale-rerank", type=int, nargs="+", default=[1, 4, 10, 25, 50])
    ap.add_argument("--scale-tmp", default=None, help="scale: folder for the vectors and the index (default: a temporary one)")
    ap.add_argument("--scale-keep", action="store_true", help="scale: keep the index")
    ap.add_argument("--scale-index", default=None, help="scale: measure this kept index again (no generation, no build)")
    ap.add_argument("--scale-again", action="store_true", help="scale: each setting twice (page cache warm) + IVF-PQ alone")
    ap.add_argument("--pairwise-videos", type=int, default=100_000)
    ap.add_argument("--pairwise-frames", type=int, default=12)
    ap.add_argument("--pairwise-candidates", type=int, nargs="+", default=[100, 300, 1000, 3000, 10000])
    ap.add_argument("--latency-videos", type=int, default=1_000_000)
    ap.add_argument("--latency-queries", type=int, default=50)
    ap.add_argument("--latency-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--latency-world", default="small", help="latency: the synthetic world of the demo's queries")
    sections = ["encode", "search", "build", "load", "memory", "stores", "scale", "pairwise", "latency"]
    ap.add_argument("--skip", nargs="*", default=[], choices=sections)
    ap.add_argument("--only", nargs="*", default=None, choices=sections, help="run only these sections")
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench" / "bench_search.json"), help="where to write the numbers")
    args = ap.parse_args(argv)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}
    try:
        res["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        tmp = Path(tmp)
        for name, fn in (("encode", bench_encode), ("memory", bench_memory), ("load", bench_load), ("build", bench_build),
                         ("search", bench_search), ("stores", bench_stores), ("scale", bench_scale),
                         ("pairwise", bench_pairwise), ("latency", bench_latency)):
            if name in args.skip or (args.only is not None and name not in args.only):
                continue
            if args.only is None and name in ("scale", "pairwise", "latency"):  # long: only when asked (--only)
                continue
            t = time.perf_counter()
            res[name] = fn(args, tmp)
            log(f"[{name}: {time.perf_counter() - t:.0f} s]")
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2))
    res["loadavg_end"] = list(os.getloadavg())
    Path(args.json).write_text(json.dumps(res, indent=2))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
