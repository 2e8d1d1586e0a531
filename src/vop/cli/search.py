"""`vop index`, `vop search` and `vop serve`: search your own videos with a trained checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer


def index_cmd(
    videos: Path = typer.Option(..., "--videos", help="A folder of videos (searched recursively) or a collection annotation file (.csv/.jsonl)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Prompt checkpoint (.safetensors) written by vop train, or the authors' ModelScope model folder."),
    out: Path = typer.Option(..., "--out", help="Index folder (created; re-running updates it)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP weights (default: the one recorded in the checkpoint)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Videos per forward pass."),
    split: str = typer.Option("all", "--split", help="Annotation files: which split's videos (default all)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Annotation files: folder the video paths are relative to (default: the file's folder)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames per video (default: the checkpoint's)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Model input size (default: the backbone's)."),
    workers: int = typer.Option(2, "--workers", "-j", help="Decoding worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda."),
    content_hash: bool = typer.Option(False, "--hash", help="Detect changed videos by SHA-256 of their bytes (default: size + mtime)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Re-encode every video (e.g. after changing the checkpoint)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try again the videos that could not be read last time."),
    store: Optional[str] = typer.Option(None, "--store", help="Where the vectors go: faiss (the index folder; the default for a new index), milvus:///PATH/FILE.db[/COLLECTION] or milvus:FILE.db[/COLLECTION] (a Milvus Lite file) or milvus://HOST[:PORT][/COLLECTION] (a Milvus server or cluster). Default: keep the index's. Another store moves the vectors there without encoding again."),
    ann: Optional[str] = typer.Option(None, "--ann", help="Approximate index, in either store: auto (exact below 250,000 videos, then IVF-Flat, IVF-PQ from 4M; the default for a new index), exact (none), ivf, ivfpq or hnsw. Default: keep the index's. Not for models without one vector per video (cma's query score): their search is always exact."),
    faiss: Optional[str] = typer.Option(None, "--faiss", help="The older name of --ann."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default sqrt(N); 4 sqrt(N) for ivfpq)."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists scanned per query (default 32, more above 512 lists; 16 for ivfpq)."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="IVF-PQ: sub-quantizers, a divisor of the dimension (default D/8)."),
    rerank: Optional[int] = typer.Option(None, "--rerank", help="IVF-PQ: candidates per result re-scored exactly (k x rerank; default 100, 0: none)."),
    hnsw_m: Optional[int] = typer.Option(None, "--hnsw-m", help="HNSW links per node (default 32)."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW search breadth (default 128)."),
    thumb_frames: int = typer.Option(5, "--thumb-frames", help="Frames in each thumbnail strip."),
    thumb_height: int = typer.Option(96, "--thumb-height", help="Height of the thumbnail strips in pixels."),
    max_words: int = typer.Option(32, "--max-words", help="Query token budget used by search (as vop eval)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Encode every video of a folder or annotation file into a searchable index (resumable; run it
    again to add new or changed videos). Under torchrun, the ranks share the encoding."""
    from vop import limits
    from vop.retrieval.build import build_index
    from vop.runtime import resolve_device

    limits.check_options(("--batch-size", batch_size, 1, limits.MAX_BATCH, limits.WHY_BATCH),
                         ("--frames", frames, 1, limits.MAX_FRAMES, limits.WHY_FRAMES),
                         ("--image-size", image_size, 1, limits.MAX_IMAGE_SIZE, limits.WHY_IMAGE),
                         ("--workers", workers, 0, limits.MAX_WORKERS),
                         ("--nlist", nlist, 1, limits.MAX_ANN), ("--nprobe", nprobe, 1, limits.MAX_ANN),
                         ("--pq-m", pq_m, 1, 4096), ("--rerank", rerank, 0, 1024),
                         ("--hnsw-m", hnsw_m, 2, 1024), ("--ef-search", ef_search, 1, limits.MAX_ANN),
                         ("--thumb-frames", thumb_frames, 1, limits.MAX_FRAMES, limits.WHY_FRAMES),
                         ("--thumb-height", thumb_height, 2, limits.MAX_IMAGE_SIZE, limits.WHY_IMAGE),
                         ("--max-words", max_words, 3, limits.MAX_CONTEXT))
    resolve_device(device)  # a clear error for a bad --device, before anything is loaded
    from vop.retrieval.store import StoreSpec

    spec = StoreSpec.parse(store) if store is not None else None  # a clear error before anything is loaded
    params = {"nlist": nlist, "nprobe": nprobe, "m": pq_m, "rerank": rerank, "M": hnsw_m, "ef_search": ef_search}
    params = {k: v for k, v in params.items() if v is not None}
    r = build_index(videos, checkpoint, out, backbone=backbone, batch_size=batch_size, split=split, root=root, frames=frames,
                    image_size=image_size, max_words=max_words, num_workers=workers, device=device, content_hash=content_hash,
                    rebuild=rebuild, retry_failed=retry_failed, faiss=faiss, ann=ann, faiss_params=params or None,
                    store=spec, thumb_frames=thumb_frames, thumb_height=thumb_height, progress=not quiet)
    if not r.merged:
        return
    speed = f", {r.videos_per_second:.1f} videos/s" if r.encoded else ""
    typer.echo(f"{out}: {r.total} videos ({r.encoded} encoded, {r.reused} unchanged, {r.removed} removed, "
               f"{len(r.failed)} unreadable, {len(r.missing)} missing) in {r.seconds:.1f} s{speed}")
    if r.faiss:
        typer.echo(f"  FAISS {r.faiss['kind']}: {json.dumps(r.faiss['params'])}")
    if r.store != "faiss" and r.ann:
        typer.echo(f"  store {r.store}: {r.ann['kind']} search{': ' + json.dumps(r.ann['params']) if r.ann.get('params') else ''}")
    if r.no_ann:
        typer.echo(f"  {r.rows}: the model {r.no_ann} (no FAISS index)")
    for vid, err in list(r.failed.items())[:10]:
        typer.echo(f"  unreadable: {err}")
    for vid, err in list(r.missing.items())[:10]:
        typer.echo(f"  missing: {err}")
    if r.skipped:
        from vop.data.files import summarize_skipped

        typer.echo(f"  left out of the folder walk ({len(r.skipped)}):")
        for line in summarize_skipped([(Path(k), v) for k, v in r.skipped.items()]):
            typer.echo(f"    {line}")


def search_cmd(
    index: Path = typer.Argument(..., help="Index folder written by vop index (its vectors in the folder or in the Milvus store it records)."),
    query: Optional[str] = typer.Argument(None, help="What to look for, e.g. \"a dog jumps into a pool\"."),
    k: int = typer.Option(5, "-k", "--top", help="Results per query."),
    json_out: bool = typer.Option(False, "--json", help="JSON output (JSON lines with --queries)."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="A text file of queries, one per line."),
    exact: bool = typer.Option(False, "--exact", help="Exact search even if the index has FAISS."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF: lists scanned (recall vs speed)."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW: search breadth (recall vs speed)."),
    rerank: Optional[int] = typer.Option(None, "--rerank", help="Candidates per result re-scored exactly (k x rerank; IVF-PQ's default 100; 0: none)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Pairwise indexes (cma): score exactly only the C videos whose mean-pooled frame vectors are nearest the query (C >= k; default: every video below 250,000 videos, 1000 from there; --exact: every video; recall in docs/search.md)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP weights, if not where the index recorded them."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The index's checkpoint, if it moved."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: PyTorch's default)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the checksums of the index's files and the hashing of the backbone file (about 1.2 s per 2 GB of embeddings; see docs/search.md)."),
    text_int8: bool = typer.Option(False, "--text-int8", help="CPU: int8 dynamic quantisation of the text tower's linear layers (faster queries, a slightly different ranking: docs/search.md, \"Query latency\"). Default: fp32."),
) -> None:
    """Rank the videos of an index for a text query (k > the index's size: every video)."""
    from vop import limits
    from vop.retrieval.topk import check_k

    check_k(k, "-k")  # as every entry point checks k (more than the index holds: every video)
    limits.check_options(("-k", k, 1, limits.MAX_ANN), ("--nprobe", nprobe, 1, limits.MAX_ANN),
                         ("--ef-search", ef_search, 1, limits.MAX_ANN), ("--rerank", rerank, 0, 1024),
                         ("--candidates", candidates, 1, limits.MAX_ANN), ("--threads", threads, 0, limits.MAX_WORKERS))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from vop.errors import ConfigError
    from vop.retrieval.search import Searcher

    if (query is None) == (queries is None):
        raise ConfigError("give a query or --queries FILE (one of them)")
    texts = [query] if query is not None else [ln.strip() for ln in queries.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if any(not t.strip() for t in texts):
        raise ConfigError("empty query")
    s = Searcher.open(index, backbone=backbone, checkpoint=checkpoint, verify=not no_verify, text_int8=text_int8)
    results = []
    for i in range(0, len(texts), 256):
        results.extend(s.search(texts[i:i + 256], k, exact=exact or None, nprobe=nprobe, ef_search=ef_search, rerank=rerank,
                                candidates=candidates))
    mode = s.index.search_mode(exact, candidates)
    for text, hits in zip(texts, results):
        if json_out:
            rec = {"query": text, "index": str(index), "search": mode, "results": hits}
            if mode == "candidates":
                rec["candidates"] = s.index.candidates_for(candidates, exact or None)
            typer.echo(_json(rec, index, indent=None if queries else 2))
            continue
        if len(texts) > 1:
            typer.echo(f"\n{text}")
        for h in hits:
            dur = f"{h['duration']:6.1f}s" if h.get("duration") is not None else ""
            typer.echo(f"{h['rank']:>3}  {h['score']:.4f}  {dur}  {h['id']}")


def _json(obj, index: Path, indent: int | None) -> str:
    """Strict JSON (no NaN/Infinity, which JSON does not have): a non-finite number is an error naming the index."""
    from vop.errors import DataError

    try:
        return json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False)
    except ValueError as e:
        raise DataError(f"{index}: a result holds a number JSON cannot represent ({e}); the index is damaged: "
                        "rebuild it (vop index ... --rebuild)") from None


def serve_cmd(
    indexes: List[str] = typer.Argument(..., help="Index folders (PATH or NAME=PATH); one prompt set each."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP weights, if not where the indexes recorded them."),
    device: str = typer.Option("cpu", "--device"),
    threads: int = typer.Option(1, "--threads", help="CPU threads per query (1 keeps latency steady on a busy or small machine)."),
    allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host", help="Also answer requests for this host name (repeatable; * for any). Default: IP addresses, localhost and the --host name."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the checksums of the indexes' files and the hashing of the backbone files at start-up (see docs/search.md)."),
    text_int8: bool = typer.Option(False, "--text-int8", help="CPU: int8 dynamic quantisation of the text tower's linear layers (faster queries, a slightly different ranking: docs/search.md, \"Query latency\"). Default: fp32."),
    query_cache: int = typer.Option(1024, "--query-cache", help="Encoded queries kept (least recently used first out; keyed by the model and the exact query; 0: none)."),
) -> None:
    """A web page and JSON API (GET /api/search?q=...&k=...&index=...) over one or more indexes."""
    import torch

    from vop import limits
    from vop.retrieval.service import SearchService
    from vop.retrieval.web import require_web, serve

    limits.check_options(("--port", port, 0, 65535), ("--threads", threads, 0, limits.MAX_WORKERS),
                         ("--query-cache", query_cache, 0, 1 << 20))
    require_web()
    if threads > 0:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    svc = SearchService.load(indexes, backbone=backbone, device=device, verify=not no_verify, text_int8=text_int8,
                             cache_size=query_cache)
    for d, ld in zip(svc.describe()["indexes"], svc.indexes.values()):
        typer.echo(f"{d['name']}: {d['videos']} videos, {d['method']} ({d['checkpoint']}), "
                   f"{'shared' if d['shared_backbone'] else 'own'} backbone, {d['search']} search"
                   + (f" in {ld.index.store.where()}" if d["store"] != "faiss" else ""))
    typer.echo(f"http://{host if ':' not in host else '[' + host + ']'}:{port}/")
    serve(svc, host, port, allowed_hosts=allowed_host or ())


def register(app: typer.Typer) -> None:
    app.command("index")(index_cmd)
    app.command("search")(search_cmd)
    app.command("serve")(serve_cmd)
