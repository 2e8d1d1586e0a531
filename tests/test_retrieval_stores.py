"""Vector stores: the faiss store (the index folder) and a real Milvus Lite (a file, and the same code against its
gRPC server on a port), no mocks. Index, search, incremental update, delete, two prompt sets, moving an index
between stores; Milvus results equal the faiss/exact store's on the same embeddings (ids, scores within fp32
tolerance) and a measured recall for approximate indexes; errors through the console script (server
unreachable, package missing, file locked, pairwise model) with exit 2 and no traceback; torchrun with two
nodes into one Milvus Lite file equals one process; the ``auto`` choice of the approximate index."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vop
from vop.errors import ConfigError, DataError
from vop.retrieval import VideoIndex, build_index, write_index
from vop.retrieval.store import EXACT_BELOW, PQ_FROM, AnnChoice, StoreSpec

pytest.importorskip("pymilvus", reason="pip install -e '.[milvus]' (pymilvus + milvus-lite)")
pytest.importorskip("milvus_lite", reason="pip install -e '.[milvus]' (pymilvus + milvus-lite)")

VOP = shutil.which("vop", path=os.path.dirname(sys.executable)) or "vop"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two (untrained) prompt sets on the random tiny backbone (vop-fc, vop-f) and a cma one (pairwise scores)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for i, method in enumerate(("vop-fc", "vop-f", "cma")):
        torch.manual_seed(i)
        out[method] = vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), d / f"{method}.safetensors",
                                          extra={"backbone": "tiny"})
    return out


def _build(videos, ckpt, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("image_size", 32)
    return build_index(videos, ckpt, out, **kw)


def _queries(n, d, seed=0):
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    return q


def _same_ranking(a, b, atol=1e-5):
    """Same scores (fp32 tolerance) and the same rows, except among equal scores (ties: two copies of one video),
    which may come in either order, and at the last place, where either of two tied videos may be cut."""
    (sa, ra), (sb, rb) = a, b
    assert sa.shape == sb.shape and np.allclose(sa, sb, atol=atol), (sa, sb)
    for i in range(len(ra)):
        strict = [j for j in range(ra.shape[1]) if np.sum(np.abs(sa[i] - sa[i, j]) <= atol) == 1
                  and abs(sa[i, j] - sa[i, -1]) > atol]
        assert np.array_equal(ra[i, strict], rb[i, strict]), (ra[i], rb[i], sa[i])


def _run(*args, env=None, timeout=240):
    return subprocess.run([VOP, *map(str, args)], capture_output=True, text=True, env=env or os.environ.copy(),
                          timeout=timeout)


def _refused(proc, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert proc.stderr.strip().startswith("error: ") or "\nerror: " in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-2000:])


# ----------------------------------------------------------------------------------------------------
# the store choice and the approximate-index choice (no videos)
# ----------------------------------------------------------------------------------------------------
def test_store_spec_and_auto_choice(tmp_path):
    assert StoreSpec.parse("faiss") == StoreSpec()
    s = StoreSpec.parse(f"milvus://{tmp_path}/a.db/fc")
    assert (s.kind, s.lite, s.collection, s.uri) == ("milvus", tmp_path / "a.db", "fc", f"milvus://{tmp_path}/a.db/fc")
    s = StoreSpec.parse(f"milvus://{tmp_path}/a.db", index=tmp_path / "my-index")
    assert s.collection == "vop_my_index" and s.host is None
    s = StoreSpec.parse("milvus://10.0.0.5:19531/prompts_a")
    assert (s.host, s.port, s.collection, s.lite, s.address) == ("10.0.0.5", 19531, "prompts_a", None, "10.0.0.5:19531")
    assert StoreSpec.parse("milvus://db.example.org/x").port == 19530
    # the short form of a Lite file: milvus:FILE.db (relative to the current folder) and milvus:/ABS/FILE.db
    assert StoreSpec.parse(f"milvus:{tmp_path}/a.db/fc") == StoreSpec.parse(f"milvus://{tmp_path}/a.db/fc")
    assert StoreSpec.parse("milvus:rel.db").lite == Path(os.path.abspath("rel.db"))
    assert StoreSpec.of({"store": s.record()}) == s and StoreSpec.of({}) == StoreSpec()
    for bad, why in (("milvus", "URI"), ("milvus://h:99999/x", "not a Milvus address"), ("sqlite://x", "unknown store"),
                     ("milvus://u:p@h:1/x", "VOP_MILVUS_TOKEN"), ("milvus://h:1/9bad", "collection name")):
        with pytest.raises(ConfigError, match=why):
            StoreSpec.parse(bad)
    # auto: exact below EXACT_BELOW, IVF-Flat, IVF-PQ from PQ_FROM; parameters from the size; explicit wins
    auto = AnnChoice()
    assert auto.resolve(EXACT_BELOW - 1, 512).kind == "exact"
    r = auto.resolve(1_000_000, 512)
    assert (r.kind, r.params) == ("ivf", {"nlist": 1000, "nprobe": 62}) and "auto" in r.why
    r = auto.resolve(PQ_FROM, 512)
    assert r.kind == "ivfpq" and r.params == {"nlist": 1024, "nprobe": 16, "m": 64, "nbits": 8, "rerank": 100, "opq": False,
                                              "rerank_dtype": "float16"}
    assert AnnChoice("hnsw").resolve(10, 64).kind == "hnsw" and AnnChoice("exact").resolve(10**8, 64).exact
    assert AnnChoice.parse("ivf", {"nprobe": 7}).resolve(10_000, 64).params == {"nlist": 100, "nprobe": 7}
    assert AnnChoice.parse("none").choice == "exact"
    # an index.json written before the choice was recorded keeps what it had
    assert AnnChoice.of({"faiss": {"kind": "ivf", "params": {"nlist": 5, "nprobe": 2}}}) == AnnChoice("ivf", {"nlist": 5, "nprobe": 2})
    assert AnnChoice.of({"faiss": None}) == AnnChoice("exact") and AnnChoice.of(None) is None
    with pytest.raises(ConfigError, match="--ann"):
        AnnChoice("lsh")


def test_faiss_ivfpq_reranks_candidates_exactly(tmp_path):
    """IVF-PQ's compressed scores are replaced by exact ones for its rerank x k candidates: the scores it returns
    are the exact search's for those rows, and recall grows with rerank."""
    pytest.importorskip("faiss", reason="pip install -e '.[index]' (faiss-cpu)")
    g = np.random.default_rng(0)
    centres = g.standard_normal((40, 32)).astype(np.float32)
    emb = centres[g.integers(0, 40, 4000)] + 0.5 * g.standard_normal((4000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    entries = [{"id": f"v{i}", "path": f"/nowhere/v{i}.mp4"} for i in range(len(emb))]
    write_index(tmp_path / "pq", emb, entries, {"model": {}, "settings": {},
                                                        "faiss": {"kind": "ivfpq", "params": {"nlist": 32, "nbits": 6}}})
    ix = VideoIndex.open(tmp_path / "pq")
    p = ix.meta["faiss"]["params"]
    assert (p["m"], p["nbits"], p["nprobe"], p["rerank"]) == (4, 6, 16, 100) and ix.search_kind == "ivfpq"
    q = torch.from_numpy(emb[:50] + 0.3 * g.standard_normal((50, 32)).astype(np.float32))
    q = torch.nn.functional.normalize(q, dim=1)
    se, re = ix.search(q, 10, exact=True)
    recall = {}
    for rr in (0, 1, 4, 16):
        s, r = ix.search(q, 10, rerank=rr)
        recall[rr] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(re, r)])
        if rr:
            exact_scores = np.einsum("qd,qkd->qk", q.numpy(), emb[r])
            assert np.allclose(s, exact_scores, atol=1e-5)  # re-scored: exact scores of the rows it returns
            assert (np.diff(s, axis=1) <= 1e-7).all()
    print("IVF-PQ recall@10 by rerank:", recall)
    assert recall[16] >= recall[4] >= recall[1] and recall[16] >= 0.9 and recall[0] < 1.0


def test_indexes_written_before_stores_keep_their_search(videos, ckpts, tmp_path):
    """An index.json without ``ann`` (written before stores) keeps exactly what it had: re-running vop index with
    nothing changed writes nothing (same generation), its FAISS index and parameters stay, search is unchanged."""
    pytest.importorskip("faiss", reason="pip install -e '.[index]' (faiss-cpu)")
    q = _queries(4, 64)
    for kind in ("exact", "ivf"):
        out = tmp_path / kind
        _build(videos, ckpts["vop-fc"], out, faiss=None if kind == "exact" else "ivf")
        meta = json.loads((out / "index.json").read_text())
        meta.pop("ann")
        (out / "index.json").write_text(json.dumps(meta))
        before = VideoIndex.open(out).search(q, 5)
        r = _build(videos, ckpts["vop-fc"], out)
        after = json.loads((out / "index.json").read_text())
        assert r.encoded == 0 and after == meta  # untouched: same generation, same FAISS settings, no ann added
        ix = VideoIndex.open(out)
        assert ix.search_kind == kind and ix.store_kind == "faiss" and "store" not in after
        s, rows = ix.search(q, 5)
        assert np.array_equal(rows, before[1]) and np.array_equal(s, before[0])


# ----------------------------------------------------------------------------------------------------
# Milvus Lite: index, search, update, delete, two prompt sets, moving between stores
# ----------------------------------------------------------------------------------------------------
def test_milvus_lite_index_update_and_prompt_sets_equal_the_faiss_store(videos, ckpts, tmp_path):
    from vop.retrieval import SearchService
    from vop.retrieval.milvus import MilvusStore, video_pk

    db = tmp_path / "stores" / "videos.db"
    ref = {m: tmp_path / f"ref-{m}" for m in ("vop-fc", "vop-f")}
    mil = {m: tmp_path / f"mil-{m}" for m in ("vop-fc", "vop-f")}
    for m in ref:
        _build(videos, ckpts[m], ref[m])
        r = _build(videos, ckpts[m], mil[m], store=f"milvus://{db}/{m.replace('-', '_')}")
        assert (r.total, r.encoded, r.store) == (16, 16, f"milvus://{db}/{m.replace('-', '_')}")
        assert r.ann["kind"] == "exact" and "auto" in r.ann["why"]
    # the folder keeps index.json, the video list and the thumbnails; the vectors are in the collection
    names = sorted(p.name for p in mil["vop-fc"].iterdir())
    assert names == ["index.json", "parts", "thumbs", "videos-1.jsonl"], names
    meta = json.loads((mil["vop-fc"] / "index.json").read_text())
    assert meta["format"] == "vop-index/2" and meta["faiss"] is None and meta["store"]["index"]["type"] == "FLAT"
    assert meta["store"]["lite"] == str(db) and meta["store"]["collection"] == "vop_fc" and meta["store"]["metric"] == "IP"
    assert len(list((mil["vop-fc"] / "thumbs").iterdir())) == 16

    def check_equal(m):
        a, b = VideoIndex.open(ref[m]), VideoIndex.open(mil[m])
        try:
            assert b.store_kind == "milvus" and b.search_kind == "exact" and a.store_kind == "faiss"
            assert [e["id"] for e in a.entries] == [e["id"] for e in b.entries] and a.entries == b.entries
            assert np.allclose(a.emb, b.emb, atol=1e-7)  # the same float32 vectors came back
            q = _queries(8, 64)
            for k in (1, 5, 16, 40):  # 16 and 40 >= N: every video, ranked exactly
                _same_ranking(a.search(q, k), b.search(q, k))
            return b.meta["generation"]
        finally:
            b.close()

    assert check_equal("vop-fc") == 1 and check_equal("vop-f") == 1
    # several prompt sets over one backbone: two collections of one Milvus Lite file, one process, one CLIP
    svc = SearchService.load([f"fc={mil['vop-fc']}", f"f={mil['vop-f']}"])
    ref_svc = SearchService.load([f"fc={ref['vop-fc']}", f"f={ref['vop-f']}"])
    try:
        d = svc.describe()["indexes"]
        assert [(x["name"], x["store"], x["search"], x["videos"]) for x in d] == [("fc", "milvus", "exact", 16), ("f", "milvus", "exact", 16)]
        assert all(ld.searcher.shared for ld in svc.indexes.values())
        for name in ("fc", "f"):
            a = ref_svc.search("a red circle moves left", k=5, index=name)
            b = svc.search("a red circle moves left", k=5, index=name)
            assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
            assert np.allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]], atol=1e-5)
            assert b["search"] == "exact"
    finally:
        for ld in svc.indexes.values():
            ld.index.close()
    # re-running vop index: one new video, one replaced, one removed: an upsert and a delete in the collection
    shutil.copy(videos / "test00000.mp4", videos / "zz_new.mp4")
    shutil.copy(videos / "test00005.mp4", videos / "test00001.mp4")
    (videos / "test00003.mp4").unlink()
    for m in ref:
        ra, rb = _build(videos, ckpts[m], ref[m]), _build(videos, ckpts[m], mil[m])
        assert (ra.encoded, ra.removed, ra.total) == (rb.encoded, rb.removed, rb.total) == (2, 1, 16)
    assert check_equal("vop-fc") == 2 and check_equal("vop-f") == 2
    ix = VideoIndex.open(mil["vop-fc"])
    row = {e["id"]: i for i, e in enumerate(ix.entries)}
    emb = ix.emb
    assert "test00003.mp4" not in row and np.allclose(emb[row["test00001.mp4"]], emb[row["test00005.mp4"]], atol=1e-6)
    store = ix.store
    assert isinstance(store, MilvusStore) and store.count() == 16 and store.pks(16) == {video_pk(e["id"]) for e in ix.entries}
    ix.close()
    # nothing changed: nothing encoded, nothing written (naming the file without a collection keeps the index's)
    assert _build(videos, ckpts["vop-fc"], mil["vop-fc"]).encoded == 0
    assert _build(videos, ckpts["vop-f"], mil["vop-f"], store=f"milvus://{db}").store == f"milvus://{db}/vop_f"
    assert json.loads((mil["vop-fc"] / "index.json").read_text())["generation"] == 2
    assert json.loads((mil["vop-f"] / "index.json").read_text())["generation"] == 2
    # moving an index between stores moves its vectors, encoding nothing: folder -> Milvus -> folder
    r = _build(videos, ckpts["vop-fc"], ref["vop-fc"], store=f"milvus://{db}/moved")
    assert (r.encoded, r.total) == (0, 16) and not list(ref["vop-fc"].glob("embeddings-*"))
    check_equal_to = VideoIndex.open(ref["vop-fc"])
    moved_emb = check_equal_to.emb
    check_equal_to.close()
    assert np.allclose(moved_emb, emb, atol=1e-7)
    r = _build(videos, ckpts["vop-fc"], ref["vop-fc"], store="faiss")
    assert (r.encoded, r.total, r.store) == (0, 16, "faiss")
    back = VideoIndex.open(ref["vop-fc"])
    assert back.store_kind == "faiss" and np.array_equal(back.emb, moved_emb)
    # an approximate index in the collection: IVF-Flat, whose exact search scans every list
    r = _build(videos, ckpts["vop-fc"], mil["vop-fc"], ann="ivf", faiss_params={"nlist": 4, "nprobe": 1})
    assert r.ann["kind"] == "ivf" and r.encoded == 0
    ix = VideoIndex.open(mil["vop-fc"])
    try:
        assert ix.search_kind == "ivf" and ix.meta["store"]["index"] == {"kind": "ivf", "type": "IVF_FLAT",
                                                                        "params": {"nlist": 4, "nprobe": 1}}
        q = _queries(8, 64, seed=3)
        _same_ranking(back.search(q, 5), ix.search(q, 5, exact=True))
        _same_ranking(back.search(q, 5), ix.search(q, 5, nprobe=4))
        # the collection changed behind the index's back (same count, one video swapped): verification says so
        gone = ix.entries[3]
        ix.store.delete([gone["id"]])
        ix.store.upsert([{**gone, "id": "stranger.mp4"}], np.asarray(back.emb[3:4]))
    finally:
        ix.close()
    with pytest.raises(DataError, match=rf"lacks 1 video\(s\) of the index \(e.g. '{gone['id']}'\)"):
        VideoIndex.open(mil["vop-fc"])
    VideoIndex.open(mil["vop-fc"], verify=False).close()  # the count and the marker agree: only the keys differ


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=30):
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), r.read()


def test_console_script_index_search_serve_reindex_on_a_milvus_lite_file(videos, ckpts, tmp_path):
    """What a user types, through the vop console script: ``vop index --store milvus:FILE.db/COLLECTION`` for two
    prompt sets over one backbone (two collections of one Lite file), ``vop search`` and ``vop serve`` (an HTTP
    query through the served app) on them give the faiss store's ids and scores (exact search); re-running
    ``vop index`` after adding, changing and removing videos is an upsert and a delete in the collection (and a
    new generation in the folder), with the same results again."""
    pytest.importorskip("uvicorn", reason="pip install -e '.[serve]'")
    from vop.retrieval import Searcher
    from vop.retrieval.milvus import MilvusStore, video_pk

    db = tmp_path / "videos.db"
    sets = {"fc": "vop-fc", "f": "vop-f"}
    mil = {n: tmp_path / f"mil-{n}" for n in sets}
    ref = {n: tmp_path / f"ref-{n}" for n in sets}
    queries = ["a red circle moves left", "a blue square appears", "something green moves up"]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    common = ("--image-size", "32", "-j", "0", "-q")

    def index(n, *extra):
        r = _run("index", "--videos", videos, "--checkpoint", ckpts[sets[n]], "--out", mil[n], *common, *extra)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        return r.stdout

    def same_as_faiss(n, hits, q, k):
        want = Searcher.open(ref[n]).search([q], k=k)[0]
        assert [h["id"] for h in hits] == [h["id"] for h in want], (hits, want)
        assert np.allclose([h["score"] for h in hits], [h["score"] for h in want], atol=1e-5)
        assert [h["rank"] for h in hits] == list(range(1, len(want) + 1))
        assert [h["row"] for h in hits] == [h["row"] for h in want]  # the same video list, the same rows

    def check_search(n, k):
        r = _run("search", mil[n], "--queries", tmp_path / "q.txt", "-k", k, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        assert [x["query"] for x in lines] == queries and {x["search"] for x in lines} == {"exact"}
        for x in lines:
            same_as_faiss(n, x["results"], x["query"], k)

    def collections():
        counts = {}
        for n in sets:
            st = MilvusStore.connect(StoreSpec.parse(f"milvus://{db}/{n}"))
            try:
                st.load()
                counts[n] = (st.count(), st.pks())
            finally:
                st.close()
        return counts

    for n in sets:
        out = index(n, "--store", f"milvus:{db}/{n}")
        assert "16 videos (16 encoded, 0 unchanged, 0 removed" in out and f"store milvus://{db}/{n}: exact search" in out, out
        _build(videos, ckpts[sets[n]], ref[n])
        assert json.loads((mil[n] / "index.json").read_text())["store"]["uri"] == f"milvus://{db}/{n}"
    assert db.exists() and {n: c[0] for n, c in collections().items()} == {"fc": 16, "f": 16}
    check_search("fc", 40)  # k > N: every video, ranked exactly
    check_search("f", 5)
    # vop serve: both prompt sets from one Lite file, one CLIP; an HTTP query equals the faiss store's search
    port = _free_port()
    serve = subprocess.Popen([VOP, "serve", f"fc={mil['fc']}", f"f={mil['f']}", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                status, _, body = _get(f"{base}/api/indexes", timeout=5)
                break
            except OSError:
                assert serve.poll() is None and time.monotonic() < deadline, serve.communicate(timeout=30)[1][-3000:]
                time.sleep(0.5)
        desc = json.loads(body)
        assert [(d["name"], d["store"], d["search"], d["videos"], d["shared_backbone"]) for d in desc["indexes"]] == [
            ("fc", "milvus", "exact", 16, True), ("f", "milvus", "exact", 16, True)]
        from urllib.parse import quote

        for n in sets:
            for q in queries[:2]:
                status, ctype, body = _get(f"{base}/api/search?q={quote(q)}&k=5&index={n}")
                ans = json.loads(body)
                assert status == 200 and ans["search"] == "exact" and ans["index"] == n and ans["total"] == 16
                same_as_faiss(n, ans["results"], q, 5)
        status, ctype, body = _get(f"{base}/thumb/fc/{ans['results'][0]['row']}")
        assert status == 200 and ctype.startswith("image/") and len(body) > 100  # thumbnails stay in the folder
        status, ctype, body = _get(f"{base}/video/f/{ans['results'][0]['row']}")
        assert status == 200 and body == (videos / ans["results"][0]["id"]).read_bytes()
    finally:
        serve.terminate()
        out, err = serve.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert "fc: 16 videos" in out and f"exact search in milvus://{db}/fc (collection fc)" in out, out
    # re-running vop index: one video added, one changed, one removed: upserts and a delete in each collection
    before = collections()
    shutil.copy(videos / "test00000.mp4", videos / "zz_new.mp4")
    shutil.copy(videos / "test00005.mp4", videos / "test00001.mp4")
    (videos / "test00003.mp4").unlink()
    for n in sets:
        out = index(n)  # no --store: the index's store is kept
        assert "16 videos (2 encoded, 14 unchanged, 1 removed" in out and f"store milvus://{db}/{n}" in out, out
        _build(videos, ckpts[sets[n]], ref[n])
        assert json.loads((mil[n] / "index.json").read_text())["generation"] == 2
    after = collections()
    for n in sets:
        count, pks = after[n]
        assert count == 16 and pks == before[n][1] - {video_pk("test00003.mp4")} | {video_pk("zz_new.mp4")}
        check_search(n, 16)
    ix = VideoIndex.open(mil["fc"])
    try:
        row = {e["id"]: i for i, e in enumerate(ix.entries)}
        assert np.allclose(ix.emb[row["test00001.mp4"]], ix.emb[row["test00005.mp4"]], atol=1e-6)  # changed: re-encoded
        assert np.allclose(ix.emb[row["zz_new.mp4"]], ix.emb[row["test00000.mp4"]], atol=1e-6)
    finally:
        ix.close()


def _synthetic_milvus(path, spec, emb, ann, params=None):
    """An index in a Milvus store from given embeddings (as write_index does for the folder)."""
    from vop.retrieval.milvus import open_for_write, write_milvus

    entries = [{"id": f"v{i}", "path": f"/nowhere/v{i}.mp4", "size": 1, "mtime_ns": i, "duration": 2.0} for i in range(len(emb))]
    meta = {"model": {"checkpoint_sha256": "0" * 64}, "settings": {},
            "scoring": {"kind": "cosine", "row_shape": [emb.shape[1]], "ann": True}}
    store = open_for_write(spec, path, None, False)
    try:
        choice = AnnChoice.parse(ann, params)
        write_milvus(store, path, path, entries, list(emb), {e["id"] for e in entries}, set(), meta, None,
                     choice.resolve(len(emb), emb.shape[1]), rebuild=False, fetch_old=lambda ids: None)
    finally:
        store.close()


def test_milvus_flat_equals_exact_and_approximate_recall(tmp_path):
    """Same embeddings in both stores: Milvus FLAT (inner product) gives the exact search's ids and scores;
    IVF-Flat and HNSW reach a measured recall@10 against it (clustered vectors, queries near stored ones)."""
    g = np.random.default_rng(0)
    centres = g.standard_normal((50, 48)).astype(np.float32)
    emb = centres[g.integers(0, 50, 3000)] + 0.6 * g.standard_normal((3000, 48)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = torch.nn.functional.normalize(torch.from_numpy(emb[:40] + 0.4 * g.standard_normal((40, 48)).astype(np.float32)), dim=1)
    entries = [{"id": f"v{i}", "path": f"/nowhere/v{i}.mp4"} for i in range(len(emb))]
    write_index(tmp_path / "ref", emb, entries, {"model": {}, "settings": {}})
    ref = VideoIndex.open(tmp_path / "ref")
    se, re = ref.search(q, 10)
    db = tmp_path / "m.db"
    recall = {}
    for ann, params in (("exact", None), ("ivf", {"nlist": 50, "nprobe": 4}), ("hnsw", {"ef_search": 16})):
        path = tmp_path / ann
        _synthetic_milvus(path, StoreSpec.parse(f"milvus://{db}/{ann}"), emb, ann, params)
        ix = VideoIndex.open(path)
        try:
            s, r = ix.search(q, 10)
            if ann == "exact":
                assert np.array_equal(r, re) and np.allclose(s, se, atol=1e-6)  # fp32 tolerance
            recall[ann] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(re, r)]))
            if ann == "ivf":  # more lists scanned, more recall; every list: exact
                _, r64 = ix.search(q, 10, nprobe=50)
                assert np.array_equal(r64, re)
                _, rx = ix.search(q, 10, exact=True)
                assert np.array_equal(rx, re)
            if ann == "hnsw":
                with pytest.raises(ConfigError, match="cannot search exactly"):
                    ix.search(q, 10, exact=True)
                _, rb = ix.search(q, 10, ef_search=256)
                recall["hnsw ef 256"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(re, rb)]))
        finally:
            ix.close()
    print("Milvus Lite recall@10 against exact:", recall)
    assert recall["exact"] == 1.0 and 0.3 <= recall["ivf"] < 1.0 and recall["hnsw ef 256"] >= 0.95


def test_milvus_server_port_same_code_path_and_concurrent_processes(videos, ckpts, tmp_path):
    """``milvus://HOST:PORT/COLLECTION``: Milvus Lite's own gRPC server on a port, in its own process (what a
    standalone server or a cluster's proxy is to vop): vop index and vop search through the console script, the
    results those of the faiss store; several processes use it at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "srv"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
                time.sleep(0.2)
        uri = f"milvus://127.0.0.1:{port}/served"
        r = _run("index", "--videos", videos, "--checkpoint", ckpts["vop-fc"], "--out", tmp_path / "ix", "--store", uri,
                 "--image-size", "32", "-j", "0", "-q")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "16 videos (16 encoded" in r.stdout and f"store {uri}: exact search" in r.stdout, r.stdout
        _build(videos, ckpts["vop-fc"], tmp_path / "ref")
        procs = [subprocess.Popen([VOP, "search", str(tmp_path / ix), "a red circle moves left", "-k", "5", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ix in ("ix", "ix", "ref")]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        a, b, ref = (json.loads(o[0]) for o in outs)
        assert a == b and a["search"] == "exact"
        assert [h["id"] for h in a["results"]] == [h["id"] for h in ref["results"]]
        assert np.allclose([h["score"] for h in a["results"]], [h["score"] for h in ref["results"]], atol=1e-5)
        assert {k: v for k, v in a.items() if k not in ("index", "results")} == {k: v for k, v in ref.items() if k not in ("index", "results")}
    finally:
        server.terminate()
        server.wait(30)
    # the server gone: a clear error naming host:port, fast
    t = time.monotonic()
    r = _run("search", tmp_path / "ix", "a red circle", "-k", "3")
    _refused(r, f"127.0.0.1:{port}", "running")
    r = _run("serve", tmp_path / "ix", "--port", _free_port())
    _refused(r, f"127.0.0.1:{port}", "running")
    assert time.monotonic() - t < 120


# ----------------------------------------------------------------------------------------------------
# errors through the console script: exit 2, one line, no traceback
# ----------------------------------------------------------------------------------------------------
def test_store_errors_through_the_console_script(videos, ckpts, tmp_path):
    from vop.retrieval.milvus import MARKER, MilvusStore

    common = ("--checkpoint", ckpts["vop-fc"], "--image-size", "32", "-j", "0", "-q")
    # a server that cannot be reached: host:port and what to check, within the timeout, before any encoding
    t = time.monotonic()
    r = _run("index", "--videos", videos, *common, "--out", tmp_path / "o1", "--store", "milvus://127.0.0.1:1/x")
    _refused(r, "cannot reach the Milvus server at 127.0.0.1:1", "running", "19530")
    assert time.monotonic() - t < 60 and not (tmp_path / "o1").exists() and not any(tmp_path.glob(".o1*"))
    # pymilvus / milvus-lite not installed (a shadow package that is not there): the pip command
    for missing, store in (("pymilvus", "milvus://127.0.0.1:19530/x"), ("milvus_lite", f"milvus://{tmp_path}/x.db")):
        shadow = tmp_path / f"shadow-{missing}" / missing
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{missing}'\", name={missing!r})\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
        r = _run("index", "--videos", videos, *common, "--out", tmp_path / "o2", "--store", store, env=env)
        _refused(r, "pip install 'vop[milvus]'", missing.replace("_", "-"))
        assert not (tmp_path / "o2").exists()
    # a bad --store, and a pairwise model (per-frame rows) for the Milvus store
    r = _run("index", "--videos", videos, *common, "--out", tmp_path / "o3", "--store", "milvus:x")
    _refused(r, "--store", "milvus:///PATH/FILE.db", "milvus:FILE.db")
    r = _run("index", "--videos", videos, "--checkpoint", ckpts["cma"], "--image-size", "32", "-j", "0", "-q",
             "--out", tmp_path / "o4", "--store", f"milvus://{tmp_path}/x.db")
    _refused(r, "one vector per video", "--store faiss")
    # a Milvus Lite file open in another process: named, with what to do
    db = tmp_path / "s.db"
    assert _build(videos, ckpts["vop-fc"], tmp_path / "ix", store=f"milvus://{db}/c").total == 16
    # an index in a Milvus store opened where pymilvus is missing: vop search and vop serve name the pip command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow-pymilvus"), os.environ.get("PYTHONPATH", "")])}
    _refused(_run("search", tmp_path / "ix", "a red circle", env=env), "pip install 'vop[milvus]'", "pymilvus")
    _refused(_run("serve", tmp_path / "ix", "--port", _free_port(), env=env), "pip install 'vop[milvus]'", "pymilvus")
    holder = subprocess.Popen([sys.executable, "-c", f"from pymilvus import MilvusClient; MilvusClient({str(db)!r}); "
                               "print('open', flush=True); import time; time.sleep(120)"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        r = _run("search", tmp_path / "ix", "a red circle")
        _refused(r, str(db), "open in another process")
    finally:
        holder.kill()
        holder.wait(30)
    # the collection taken by another index, or not made by vop: refused before encoding
    r = _run("index", "--videos", videos, *common, "--out", tmp_path / "o5", "--store", f"milvus://{db}/c")
    _refused(r, "holds the vectors of another vop index", "--rebuild")
    # the collection a generation ahead (an update interrupted between the collection and index.json), then gone
    store = MilvusStore.connect(StoreSpec.parse(f"milvus://{db}/c"))
    mark = store.marker()
    store.set_marker({**mark, "generation": mark["generation"] + 1})
    store.close()
    r = _run("search", tmp_path / "ix", "a red circle")
    _refused(r, "generation 2", "interrupted", "vop index --videos")
    store = MilvusStore.connect(StoreSpec.parse(f"milvus://{db}/c"))
    store.drop()
    store.close()
    r = _run("search", tmp_path / "ix", "a red circle")
    _refused(r, "no such collection", "--rebuild", f"--store milvus://{db}/c")
    # a Milvus Lite file that is not there
    shutil.rmtree(db)
    r = _run("search", tmp_path / "ix", "a red circle")
    _refused(r, f"{db}: no such Milvus Lite file")
    assert MARKER == "vop.index"


def test_pairwise_models_keep_the_folder_store(world, ckpts, tmp_path):
    """cma's query score (per-frame rows) cannot be one vector per collection entity: --store milvus is refused
    before anything is encoded, in the API too; its index stays in the folder, exact."""
    with pytest.raises(ConfigError, match="one vector per video"):
        _build(world / "videos" / "test", ckpts["cma"], tmp_path / "a", store=f"milvus://{tmp_path}/x.db")
    assert not (tmp_path / "a").exists() and not (tmp_path / "x.db").exists()


# ----------------------------------------------------------------------------------------------------
# torchrun, 2 nodes x 1 process on this machine (one rendezvous on localhost), into one Milvus Lite file
# ----------------------------------------------------------------------------------------------------
# (the static rendezvous into the FAISS folder ran too, 2026-12-05: same rows; two ranks of one launcher into the
# folder are tests/test_retrieval_index.py::test_torchrun_two_ranks_equal_one_process; kept out of the suite's time)
@pytest.mark.parametrize("store,rdzv", [("milvus", "c10d")])
def test_torchrun_two_nodes_equal_one_process(videos, ckpts, tmp_path, store, rdzv):
    """Two nodes x one process (``--nnodes 2 --node_rank R``, two launchers, one rendezvous on 127.0.0.1: torchrun's
    c10d rendezvous backend, as on a cluster, or the static one with ``--master_addr``), gloo on the CPU: each
    encodes half, rank 0 merges and writes into one Milvus Lite file (the only process that opens it) or the
    folder; the same rows and embeddings as one process."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    db = tmp_path / "cluster.db"
    out = tmp_path / "multi"
    rendezvous = (["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "vop-test"]
                  if rdzv == "c10d" else ["--master_addr", "127.0.0.1", "--master_port", str(port)])
    cmd = lambda rank: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),  # noqa: E731
                        "--nproc_per_node", "1", *rendezvous, "-m",
                        "vop.cli.main", "index", "--videos", str(videos), "--checkpoint", str(ckpts["vop-fc"]),
                        "--out", str(out), "--store", f"milvus://{db}/multi" if store == "milvus" else "faiss",
                        "--image-size", "32", "--batch-size", "3",
                        "-j", "0", "-q"]
    t = time.monotonic()
    nodes = [subprocess.Popen(cmd(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    print(f"torchrun 2 nodes x 1 process ({rdzv} rendezvous, {store} store): {time.monotonic() - t:.1f} s")
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-3000:] for o in outs]
    # global rank 0 merges, writes and reports (with c10d, the rendezvous decides which launcher holds it)
    reports = sorted(outs, key=lambda o: o[0] == "")
    assert "16 videos (16 encoded" in reports[0][0] and reports[1][0] == "", outs
    if rdzv == "static":
        assert reports[0] is outs[0]  # --node_rank 0 holds rank 0
    multi = VideoIndex.open(out)
    try:
        assert multi.meta["last_run"]["encoded_per_rank"] == [8, 8] and multi.meta["last_run"]["world_size"] == 2
        assert multi.store_kind == store
        if store == "milvus":
            assert multi.meta["store"]["lite"] == str(db) and multi.meta["store"]["collection"] == "multi"
        _build(videos, ckpts["vop-fc"], tmp_path / "single", batch_size=4)
        single = VideoIndex.open(tmp_path / "single")
        assert [e["id"] for e in multi.entries] == [e["id"] for e in single.entries]
        assert multi.entries == single.entries  # the same rows: ids, paths, metadata, thumbnails
        assert np.allclose(multi.emb, single.emb, atol=1e-6)
        q = _queries(6, 64)
        _same_ranking(multi.search(q, 5), single.search(q, 5))
    finally:
        multi.close()
