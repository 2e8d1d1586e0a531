"""Search at scale (issue 27, parts 2-4): IVF-PQ built in bounded memory (a memory-mapped embeddings file gives the
same index as the array in memory), large embeddings memory-mapped and still verified, IVF-PQ re-ranked from its
float16 copy with exact float32 scores; cma's candidates-then-rescore search (C >= N is the exact pairwise search,
exactly; fewer: exact scores for the rows it returns), the query cache (a hit returns the very same embedding and
results), the int8 text tower; the new options through the console script (exit 2, no traceback, option named)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import vop
from vop.errors import ConfigError, DataError
from vop.retrieval import SearchService, Searcher, VideoIndex, build_index, write_index
from vop.retrieval import format as fmt
from vop.retrieval.topk import pooled_then_rescore, top_k

VOP = shutil.which("vop", path=os.path.dirname(sys.executable)) or "vop"


def _run(*args):
    p = subprocess.run([VOP, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p


def _clustered(n, d, seed=0, clusters=20):
    g = np.random.default_rng(seed)
    c = g.standard_normal((clusters, d)).astype(np.float32)
    x = c[g.integers(0, clusters, n)] + 0.5 * g.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _entries(n):
    return [{"id": f"v{i}", "path": f"/nowhere/v{i}.mp4"} for i in range(n)]


# ---------------------------------------------------------------------------------------------- IVF-PQ at scale
def test_ivfpq_from_a_memory_map_equals_the_build_in_memory(tmp_path):
    """The chunked build (sample for training, rows added in chunks, pages of a memory map let go) over a
    memory-mapped file gives the very index the rows in memory give: same results, same scores."""
    pytest.importorskip("faiss", reason="pip install -e '.[index]' (faiss-cpu)")
    from vop.retrieval import ann

    emb = _clustered(5000, 32)
    np.save(tmp_path / "e.npy", emb)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    assert np.array_equal(np.concatenate([c for _, c in ann.iter_rows(mm, 777)]), emb)
    params = {"nlist": 16, "nbits": 6}
    a, pa = ann.build_faiss(emb, "ivfpq", params)
    b, pb = ann.build_faiss(mm, "ivfpq", params)
    assert pa == pb and pa["nlist"] == 16 and pa["m"] == 4 and pa["rerank_dtype"] == "float16"
    assert a.ntotal == b.ntotal == 5000
    q = emb[:40] + 0.1
    sa, ia = a.search(q, 20)
    sb, ib = b.search(q, 20)
    assert np.array_equal(ia, ib) and np.array_equal(sa, sb)
    # the auto choice's IVF-PQ lists are capped so that a 10M build assigns 10M x 1024 (docs/search.md)
    assert ann.default_params("ivfpq", 10_000_000, 512)["nlist"] == ann.PQ_NLIST_MAX == 1024


def test_large_embeddings_are_memory_mapped_verified_and_reranked_from_float16(tmp_path, monkeypatch):
    """Above MMAP_FROM bytes the embeddings are hashed, then memory-mapped (not read into memory); IVF-PQ re-ranks
    its candidates from rerank-G.npy (float16 copy of the rows) and returns exact float32 scores; a flipped byte
    is still caught; a missing re-rank file is named."""
    pytest.importorskip("faiss", reason="pip install -e '.[index]' (faiss-cpu)")
    emb = _clustered(3000, 32, seed=1)
    write_index(tmp_path / "pq", emb, _entries(3000),
                {"model": {}, "settings": {}, "faiss": {"kind": "ivfpq", "params": {"nlist": 16, "nbits": 6}}})
    meta = json.loads((tmp_path / "pq" / "index.json").read_text())
    half = np.load(tmp_path / "pq" / meta["files"]["rerank"])
    assert half.dtype == np.float16 and np.array_equal(half, emb.astype(np.float16))
    assert meta["files"]["rerank"] in meta["checksums"]
    q = torch.nn.functional.normalize(torch.from_numpy(emb[:30] + 0.2 * _clustered(30, 32, seed=2)), dim=1)
    ref = VideoIndex.open(tmp_path / "pq")
    assert not isinstance(ref.store.emb, np.memmap)
    s_ref, r_ref = ref.search(q, 10, rerank=8)
    monkeypatch.setattr(fmt, "MMAP_FROM", 1)
    ix = VideoIndex.open(tmp_path / "pq")
    assert isinstance(ix.store.emb, np.memmap) and np.array_equal(np.asarray(ix.store.emb), emb)
    s, r = ix.search(q, 10, rerank=8)
    assert np.array_equal(r, r_ref) and np.array_equal(s, s_ref)
    exact = np.einsum("qd,qkd->qk", q.numpy(), emb[r])  # the scores returned are the float32 rows' scores
    assert np.allclose(s, exact, atol=1e-6)
    _, r_exact = ix.search(q, 10, exact=True)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r, r_exact)]) >= 0.8  # 0.87 measured (4 x 6-bit codes)
    f = tmp_path / "pq" / meta["files"]["embeddings"]
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"embeddings-1\.npy.*SHA-256"):
        VideoIndex.open(tmp_path / "pq")
    (tmp_path / "pq" / meta["files"]["rerank"]).unlink()
    with pytest.raises(DataError, match=r"rerank-1\.npy: missing"):
        VideoIndex.open(tmp_path / "pq", verify=False)


# ------------------------------------------------------------------------------------ pairwise (cma) candidates
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vop.data import generate_world

    d = tmp_path_factory.mktemp("world")
    generate_world(d, size="smoke")
    return d


@pytest.fixture(scope="module")
def indexes(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("ix")
    out = {}
    for i, method in enumerate(("cma", "vop-fc")):
        torch.manual_seed(i)
        ck = vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), d / f"{method}.safetensors",
                                 extra={"backbone": "tiny"})
        build_index(world / "videos" / "test", ck, d / method, image_size=32, progress=False)
        out[method] = d / method
    return out


def test_cma_candidates_equal_the_exact_pairwise_search(tmp_path):
    """Mean-pooled frame vectors give C candidates, re-scored exactly by cma's query score: C >= N is the exact
    pairwise search (identical rows and scores); C < N returns the exact pairwise scores of the rows it keeps."""
    torch.manual_seed(0)
    model = vop.create_model("cma", "tiny", frames=4).eval()
    d = model.clip.cfg.embed_dim
    g = np.random.default_rng(0)
    centres = g.standard_normal((30, d)).astype(np.float32)
    rows = (centres[g.integers(0, 30, 400)][:, None] + 0.7 * g.standard_normal((400, 4, d))).astype(np.float32)
    write_index(tmp_path / "cma", rows, _entries(400),
                {"model": {"method": "cma"}, "settings": {},
                 "scoring": {"kind": "qscore", "row_shape": [4, d], "ann": False}})
    ix = VideoIndex.open(tmp_path / "cma")
    q = torch.from_numpy(rows[:12].mean(1) + 0.5 * g.standard_normal((12, d)).astype(np.float32))
    s_ex, r_ex = ix.search(q, 10, model=model)
    for c in (400, 401, 10**6):
        s, r = ix.search(q, 10, model=model, candidates=c)
        assert np.array_equal(r, r_ex) and np.array_equal(s, s_ex)
    all_s, all_r = ix.search(q, 400, model=model)  # every video's exact score
    exact = {(i, int(v)): float(x) for i in range(12) for x, v in zip(all_s[i], all_r[i])}
    s, r = ix.search(q, 10, model=model, candidates=60)
    assert ix.search_mode(None, 60) == "candidates" and ix.search_mode(None, 400) == "exact"
    assert all(abs(exact[(i, int(v))] - float(x)) < 1e-5 for i in range(12) for x, v in zip(s[i], r[i]))
    assert all(list(s[i]) == sorted(s[i], reverse=True) for i in range(12))
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r, r_ex)]) >= 0.8
    # the function itself: exactly the exact search's from C = N, refused below k
    sc = model.scoring
    t = torch.from_numpy(rows)
    pooled = torch.nn.functional.normalize(t.mean(1), dim=-1)
    assert all(np.array_equal(a, b) for a, b in zip(pooled_then_rescore(sc, t, pooled, q, 5, 400), top_k(sc, t, q, 5)))
    with pytest.raises(ConfigError, match="fewer than the 10 results"):
        ix.search(q, 10, model=model, candidates=9)


def test_cma_candidates_through_the_console_script(indexes):
    cma, fc = indexes["cma"], indexes["vop-fc"]
    n = len(VideoIndex.open(cma))
    exact = _run("search", cma, "a red circle moves left", "-k", "3", "--json")
    assert exact.returncode == 0, exact.stderr
    full = _run("search", cma, "a red circle moves left", "-k", "3", "--json", "--candidates", n)
    assert full.returncode == 0, full.stderr
    a, b = json.loads(exact.stdout), json.loads(full.stdout)
    assert a["results"] == b["results"] and b["search"] == "exact" and "candidates" not in b
    some = json.loads(_run("search", cma, "a red circle moves left", "-k", "3", "--json", "--candidates", n - 1).stdout)
    assert some["search"] == "candidates" and some["candidates"] == n - 1 and len(some["results"]) == 3
    for args, want in (((cma, "x", "-k", "3", "--candidates", "2"), "--candidates 2 is fewer than the 3 results"),
                       ((cma, "x", "--candidates", "0"), "--candidates must be >= 1, got 0"),
                       ((fc, "x", "--candidates", "5"), "--candidates: .* is a dual-encoder index")):
        p = _run("search", *args)
        assert p.returncode == 2, p.stdout + p.stderr
        assert p.stderr.startswith("error: ") and __import__("re").search(want, p.stderr), p.stderr


# ------------------------------------------------------------------------------------ query cache, int8 tower
def test_query_cache_returns_the_same_embedding_and_results(indexes):
    svc = SearchService.load([f"fc={indexes['vop-fc']}", f"fc2={indexes['vop-fc']}"], cache_size=2)
    first = svc.search("a red circle moves left", 5, "fc")
    assert svc.cache.stats() == {"size": 2, "entries": 1, "hits": 0, "misses": 1}
    again = svc.search("a red circle moves left", 5, "fc")
    assert again["results"] == first["results"] and svc.cache.hits == 1
    # the same model behind another name shares the entry (keyed by the model's fingerprint, not the name)
    other = svc.search("a red circle moves left", 5, "fc2")
    strip = lambda res: [{k: v for k, v in h.items() if k not in ("thumb", "video")} for h in res["results"]]  # noqa: E731
    assert strip(other) == strip(first) and svc.cache.hits == 2
    s = svc.get("fc").searcher
    cached = s.encode(["a red circle moves left"])
    assert torch.equal(cached, s._encode(["a red circle moves left"]))  # what the tower gives, bit for bit
    assert svc.cache.get(s.fingerprint, "a red circle moves left") is not None
    assert svc.cache.get(s.fingerprint, "a red circle moves left ") is None  # the exact string, nothing normalised
    svc.search("query two", 5, "fc")
    svc.search("query three", 5, "fc")  # size 2: the least recently used goes
    assert len(svc.cache) == 2 and svc.cache.get(s.fingerprint, "a red circle moves left") is None


def test_int8_text_tower_has_its_own_cache_key_and_a_close_ranking(indexes):
    from vop.retrieval.search import QueryCache, quantize_text_tower

    cache = QueryCache()
    fp32 = Searcher.open(indexes["vop-fc"], cache=cache)
    int8 = Searcher.open(indexes["vop-fc"], cache=cache, text_int8=True)
    assert (fp32.text_precision, int8.text_precision) == ("fp32", "int8") and fp32.fingerprint != int8.fingerprint
    linears = [m for m in int8.model.clip.transformer.modules() if type(m) is torch.nn.Linear]
    assert not linears and quantize_text_tower(int8.model) == 0  # all replaced (again: nothing left)
    qa, qb = fp32.encode(["a red circle moves left"]), int8.encode(["a red circle moves left"])
    assert len(cache) == 2 and not torch.equal(qa, qb)
    assert float(torch.nn.functional.cosine_similarity(qa, qb)) > 0.98
    p = _run("search", indexes["vop-fc"], "a red circle moves left", "-k", "3", "--json", "--text-int8")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["results"]) == 3


def test_serve_query_cache_option_is_checked():
    p = _run("serve", "nowhere", "--query-cache", "-1")
    assert p.returncode == 2 and "--query-cache must be >= 0, got -1" in p.stderr, p.stderr


def test_large_pairwise_indexes_default_to_candidates(tmp_path, monkeypatch):
    """From EXACT_BELOW videos a pairwise index is searched with RESCORED_CANDIDATES candidates unless told
    otherwise (--candidates, --exact); the mode and C are what the answers record."""
    from vop.retrieval import store

    torch.manual_seed(0)
    model = vop.create_model("cma", "tiny", frames=4).eval()
    d = model.clip.cfg.embed_dim
    rows = np.random.default_rng(5).standard_normal((300, 4, d)).astype(np.float32)
    write_index(tmp_path / "cma", rows, _entries(300), {"model": {"method": "cma"}, "settings": {},
                                                        "scoring": {"kind": "qscore", "row_shape": [4, d], "ann": False}})
    ix = VideoIndex.open(tmp_path / "cma")
    q = torch.from_numpy(rows[:5].mean(1))
    exact = ix.search(q, 10, model=model)
    assert ix.candidates_for() is None and ix.search_mode() == "exact"
    monkeypatch.setattr(store, "EXACT_BELOW", 200)
    monkeypatch.setattr(store, "RESCORED_CANDIDATES", 40)
    assert ix.candidates_for() == 40 and ix.search_mode() == "candidates" and ix.candidates_for(None, True) is None
    default = ix.search(q, 10, model=model)
    explicit = ix.search(q, 10, model=model, candidates=40)
    assert all(np.array_equal(a, b) for a, b in zip(default, explicit))
    assert all(np.array_equal(a, b) for a, b in zip(ix.search(q, 10, model=model, exact=True), exact))
    assert ix.search_mode(True) == "exact" and ix.candidates_for(300) is None  # C >= N: every video, exactly
