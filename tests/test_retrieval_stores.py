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
def world(tmp_path_factory):
    from vop.data import generate_world

    d = tmp_path_factory.mktemp("world")
    generate_world(d, size="smoke")
    return d


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


@pytest.fixture
def videos(world, tmp_path):
    d = tmp_path / "vids"
    shutil.copytree(world / "videos" / "test", d)
    return d


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
    assert time.monotonic() - t < 60


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
    r = _run("index", "--videos", videos, *common, "--out", tmp_path / "o3", "--store", "milvus:/x.db")
    _refused(r, "--store", "milvus:///PATH/FILE.db")
    r = _run("index", "--videos", videos, "--checkpoint", ckpts["cma"], "--image-size", "32", "-j", "0", "-q",
             "--out", tmp_path / "o4", "--store", f"milvus://{tmp_path}/x.db")
    _refused(r, "one vector per video", "--store faiss")
    # a Milvus Lite file open in another process: named, with what to do
    db = tmp_path / "s.db"
    assert _build(videos, ckpts["vop-fc"], tmp_path / "ix", store=f"milvus://{db}/c").total == 16
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
@pytest.mark.parametrize("store", ["milvus", "faiss"])
def test_torchrun_two_nodes_equal_one_process(videos, ckpts, tmp_path, store):
    """Two nodes x one process (``--nnodes 2 --node_rank R``, a static rendezvous on 127.0.0.1): each encodes half,
    rank 0 merges and writes into one Milvus Lite file (the only process that opens it) or the folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    db = tmp_path / "cluster.db"
    out = tmp_path / "multi"
    cmd = lambda rank: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),  # noqa: E731
                        "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m",
                        "vop.cli.main", "index", "--videos", str(videos), "--checkpoint", str(ckpts["vop-fc"]),
                        "--out", str(out), "--store", f"milvus://{db}/multi" if store == "milvus" else "faiss",
                        "--image-size", "32", "--batch-size", "3",
                        "-j", "0", "-q"]
    nodes = [subprocess.Popen(cmd(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-3000:] for o in outs]
    assert "16 videos (16 encoded" in outs[0][0] and outs[1][0] == ""  # rank 0 merges, writes and reports
    multi = VideoIndex.open(out)
    try:
        assert multi.meta["last_run"]["encoded_per_rank"] == [8, 8] and multi.meta["last_run"]["world_size"] == 2
        assert multi.store_kind == store
        _build(videos, ckpts["vop-fc"], tmp_path / "single", batch_size=4)
        single = VideoIndex.open(tmp_path / "single")
        assert [e["id"] for e in multi.entries] == [e["id"] for e in single.entries]
        assert np.allclose(multi.emb, single.emb, atol=1e-6)
    finally:
        multi.close()
