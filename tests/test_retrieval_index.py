"""Video index: same embeddings as the evaluation engine, resumable after a kill, incremental updates,
unreadable videos, settings guard, torchrun sharding, FAISS, thumbnails."""
import json
import os
import shutil
import subprocess
import sys
import zlib

from pathlib import Path

import numpy as np
import pytest
import torch

import vop
from vop.errors import ConfigError, DataError
from vop.retrieval import VideoIndex, build_index, exact_search, list_sources, write_index
from vop.retrieval.index import building_path
from vop.retrieval.images import encode_png, thumbnail_strip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An (untrained) vop-fc prompt checkpoint on the random tiny backbone: enough for index mechanics."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = vop.create_model("vop-fc", "tiny", frames=4)
    return vop.save_checkpoint(m, d / "a.safetensors", extra={"backbone": "tiny"})


def _build(videos, ckpt, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("image_size", 32)
    return build_index(videos, ckpt, out, **kw)


def test_index_equals_evaluation_embeddings_and_records_metadata(world, ckpt, tmp_path):
    from vop.data import get_dataset
    from vop.runtime import encode_videos

    r = _build(world / "captions.jsonl", ckpt, tmp_path / "ix", split="test", batch_size=5)
    assert (r.total, r.encoded, r.reused, r.failed) == (16, 16, 0, {})
    ix = VideoIndex.open(tmp_path / "ix")
    ds = get_dataset("collection", world, "test", frames=4, size=32, train=False)
    model = vop.load_checkpoint(ckpt, "tiny").eval()
    emb, ids, _ = encode_videos(model, ds.video_dataset(), batch_size=5)
    assert [e["id"] for e in ix.entries] == ids == ds.videos
    assert torch.equal(torch.from_numpy(ix.emb), emb)  # same frames, same model, same batches: bit-identical
    assert np.allclose(np.linalg.norm(ix.emb, axis=1), 1, atol=1e-5)
    e = ix.entries[0]
    assert e["duration"] == 2.0 and e["num_frames"] == 16 and e["frame_indices"] == [2, 6, 9, 13]
    assert e["captions"] == [ds.captions[0]] and os.path.isabs(e["path"])
    meta = ix.meta
    assert meta["model"]["method"] == "vop-fc" and meta["model"]["backbone"] == "tiny"
    assert meta["model"]["checkpoint_meta"] == vop.read_checkpoint_meta(ckpt)
    assert meta["settings"]["frames"] == 4 and meta["settings"]["image_size"] == 32 and meta["dim"] == 64
    # thumbnail: the 4 sampled frames side by side, 96 px high, as a JPEG
    data = (tmp_path / "ix" / "thumbs" / e["thumb"]).read_bytes()
    assert data[:2] == b"\xff\xd8"
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        import io

        assert Image.open(io.BytesIO(data)).size == (4 * 96, 96)


def test_killed_run_resumes_and_updates_incrementally(videos, ckpt, tmp_path):
    out = tmp_path / "ix"
    import inspect

    from vop.retrieval.index import TEST_STOP_ENV

    assert not any(n.startswith("_") for n in inspect.signature(build_index).parameters)  # the hook is no parameter
    code = (f"from vop.retrieval import build_index; build_index({str(videos)!r}, {str(ckpt)!r}, {str(out)!r}, "
            "image_size=32, batch_size=2, flush_videos=4, progress=False)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, TEST_STOP_ENV: "2"})
    assert proc.returncode == 3, proc.stderr[-2000:]  # killed after 2 flushed parts (8 videos), no merge yet
    # a new index is built next to its folder, which appears only when complete
    work = building_path(out)
    assert not out.exists() and len(list((work / "parts").glob("*.npz"))) == 2
    r = _build(videos, ckpt, out, batch_size=4)
    assert (r.total, r.encoded, r.reused) == (16, 8, 8)
    fresh = _build(videos, ckpt, tmp_path / "fresh", batch_size=16)
    a, b = VideoIndex.open(out), VideoIndex.open(tmp_path / "fresh")
    assert [e["id"] for e in a.entries] == [e["id"] for e in b.entries] and fresh.encoded == 16
    assert np.allclose(a.emb, b.emb, atol=1e-6)
    assert not list((out / "parts").glob("*.npz")) and not work.exists()
    # nothing changed: nothing encoded, index untouched
    gen = a.meta["generation"]
    r = _build(videos, ckpt, out)
    assert (r.encoded, r.reused, r.total) == (0, 16, 16) and VideoIndex.open(out).meta["generation"] == gen
    # one new, one replaced, one removed
    shutil.copy(videos / "test00000.mp4", videos / "zz_new.mp4")
    shutil.copy(videos / "test00002.mp4", videos / "test00001.mp4")
    (videos / "test00003.mp4").unlink()
    r = _build(videos, ckpt, out)
    assert (r.encoded, r.removed, r.total) == (2, 1, 16)
    ix = VideoIndex.open(out)
    row = {e["id"]: i for i, e in enumerate(ix.entries)}
    assert "test00003.mp4" not in row and np.allclose(ix.emb[row["test00001.mp4"]], ix.emb[row["test00002.mp4"]], atol=1e-6)
    assert np.allclose(ix.emb[row["zz_new.mp4"]], ix.emb[row["test00000.mp4"]], atol=1e-6)
    assert len(list((out / "thumbs").iterdir())) == 16  # the replaced and removed videos' strips are gone
    # content hashes: a touched but identical file is not encoded again
    _build(videos, ckpt, out, content_hash=True, rebuild=True)
    os.utime(videos / "test00004.mp4", ns=(1, 1))
    assert _build(videos, ckpt, out, content_hash=True).encoded == 0
    assert _build(videos, ckpt, out, content_hash=False).encoded == 1


def test_a_large_rerun_merges_its_rows_through_a_memory_map(videos, ckpt, tmp_path, monkeypatch):
    """Above MMAP_FROM bytes the rows of a re-run (the index's, memory-mapped, and the new ones) are merged into a
    memory-mapped file block by block, never stacked in memory; the index written is the one an in-memory merge
    writes, and the file is gone afterwards."""
    import vop.retrieval.build as build
    import vop.retrieval.format as fmt

    small, large = tmp_path / "small", tmp_path / "large"
    _build(videos, ckpt, small)
    shutil.copytree(small, large)
    shutil.copy(videos / "test00000.mp4", videos / "zz_new.mp4")
    shutil.copy(videos / "test00002.mp4", videos / "test00001.mp4")
    (videos / "test00003.mp4").unlink()
    made = []
    stack = build._stack_rows
    monkeypatch.setattr(build, "_stack_rows", lambda *a: made.append(stack(*a)) or made[-1])
    assert _build(videos, ckpt, small).encoded == 2 and type(made[-1]) is np.ndarray
    monkeypatch.setattr(fmt, "MMAP_FROM", 1)  # every index "large": its rows mapped, the merge through a file
    monkeypatch.setattr(build, "_MERGE_BLOCK", 5)  # 16 rows in four blocks
    assert _build(videos, ckpt, large).encoded == 2 and isinstance(made[-1], np.memmap)
    assert Path(made[-1].filename).name == build.MERGED_FILE and not Path(made[-1].filename).exists()
    a, b = VideoIndex.open(small), VideoIndex.open(large)
    assert [e["id"] for e in a.entries] == [e["id"] for e in b.entries] and "test00003.mp4" not in {e["id"] for e in a.entries}
    assert np.array_equal(np.asarray(a.emb), np.asarray(b.emb))
    assert a.meta["checksums"] == b.meta["checksums"]


def test_unreadable_videos_are_listed_not_fatal(videos, ckpt, tmp_path):
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    (videos / ".hidden").mkdir()
    shutil.copy(videos / "test00000.mp4", videos / ".hidden" / "x.mp4")
    r = _build(videos, ckpt, tmp_path / "ix")
    assert r.total == 16 and list(r.failed) == ["broken.mp4"] and "broken.mp4" in r.failed["broken.mp4"]
    assert _build(videos, ckpt, tmp_path / "ix").encoded == 0  # not retried unless asked
    r = _build(videos, ckpt, tmp_path / "ix", retry_failed=True)
    assert list(r.failed) == ["broken.mp4"] and r.total == 16
    assert VideoIndex.open(tmp_path / "ix").meta["failed"][0]["id"] == "broken.mp4"


def test_other_checkpoint_needs_rebuild(videos, ckpt, tmp_path):
    _build(videos, ckpt, tmp_path / "ix")
    torch.manual_seed(1)
    other = vop.save_checkpoint(vop.create_model("vop-fc", "tiny", frames=4), tmp_path / "b.safetensors", extra={"backbone": "tiny"})
    with pytest.raises(ConfigError, match="--rebuild"):
        _build(videos, other, tmp_path / "ix")
    with pytest.raises(ConfigError, match="frames"):
        _build(videos, ckpt, tmp_path / "ix", frames=6)
    assert _build(videos, other, tmp_path / "ix", rebuild=True).encoded == 16
    from vop.retrieval import Searcher

    shutil.copy(ckpt, other)  # the indexed checkpoint changed on disk: search refuses it
    with pytest.raises(vop.CheckpointError, match="differs"):
        Searcher.open(tmp_path / "ix")


def test_cli_errors_and_sources(world, tmp_path, capsys):
    from vop.cli.main import main

    assert main(["index", "--videos", str(tmp_path / "nope"), "--checkpoint", "x.safetensors", "--out", str(tmp_path / "o")]) == 2
    assert main(["search", str(tmp_path), "a circle"]) == 2
    err = capsys.readouterr().err
    assert "no such prompt checkpoint" in err and "not a vop index" in err
    with pytest.raises(DataError, match="no such folder"):
        list_sources(tmp_path / "nope")
    found, missing = list_sources(world / "captions.jsonl", split="val")
    assert len(found) == 4 and not missing and all(s.captions for s in found)
    (tmp_path / "c.csv").write_text("video,caption\nvideos/test/test00000.mp4,a\nvideos/none.mp4,b\n")
    shutil.copytree(world / "videos", tmp_path / "videos")
    found, missing = list_sources(tmp_path / "c.csv")
    assert [s.id for s in found] == ["videos/test/test00000.mp4"] and list(missing) == ["videos/none.mp4"]


def test_torchrun_two_ranks_equal_one_process(videos, ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "multi"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                           "vop.cli.main", "index", "--videos", str(videos), "--checkpoint", str(ckpt), "--out", str(out),
                           "--image-size", "32", "--batch-size", "3", "-j", "0", "-q"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 videos (16 encoded" in proc.stdout
    multi = VideoIndex.open(out)
    assert multi.meta["last_run"]["encoded_per_rank"] == [8, 8]
    _build(videos, ckpt, tmp_path / "single", batch_size=4)
    single = VideoIndex.open(tmp_path / "single")
    assert [e["id"] for e in multi.entries] == [e["id"] for e in single.entries]
    assert np.allclose(multi.emb, single.emb, atol=1e-6)


def _random_index(path, n, d, faiss=None, seed=0):
    g = np.random.default_rng(seed)
    emb = g.standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    entries = [{"id": f"v{i}", "path": f"/nowhere/v{i}.mp4"} for i in range(n)]
    write_index(path, emb, entries, {"model": {}, "settings": {}, "faiss": faiss})
    return emb


def test_exact_search_streams_and_orders_ties(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=1)
    emb[500] = emb[7]  # an exact tie: lower row first
    q = torch.cat([emb[7:8], torch.randn(3, 16, generator=g)])
    s1, r1 = exact_search(emb, q, 10)
    s2, r2 = exact_search(emb, q, 10, chunk=64)
    full = (q @ emb.T).topk(10, dim=1)
    assert np.array_equal(r1, r2) and np.allclose(s1, full.values.numpy())
    assert r1[0, 0] == 7 and r1[0, 1] == 500
    assert set(r1[1:].ravel()) == set(full.indices[1:].numpy().ravel())


def test_faiss_ivf_and_hnsw(tmp_path):
    pytest.importorskip("faiss", reason="pip install -e '.[index]' (faiss-cpu)")
    emb = _random_index(tmp_path / "ivf", 2000, 32, {"kind": "ivf", "params": {"nlist": 16, "nprobe": 16}})
    _random_index(tmp_path / "hnsw", 2000, 32, {"kind": "hnsw", "params": {}})
    q = emb[:50] + 0.05 * np.random.default_rng(1).standard_normal((50, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ivf = VideoIndex.open(tmp_path / "ivf")
    _, exact = ivf.search(q, 10, exact=True)
    s, approx = ivf.search(q, 10)  # nprobe = nlist: every list scanned, so exact
    assert np.array_equal(np.sort(exact, 1), np.sort(approx, 1))
    _, few = ivf.search(q, 10, nprobe=1)
    recall1 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, few)])
    assert recall1 < 1.0  # one list of 16: approximate indeed
    hnsw = VideoIndex.open(tmp_path / "hnsw")
    _, h = hnsw.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, h)]) > 0.9
    assert hnsw.meta["faiss"]["params"] == {"M": 32, "ef_construction": 200, "ef_search": 128}


def test_png_writer_and_strip():
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    strip = thumbnail_strip(frames, 20)
    assert strip.shape == (20, 3 * 30, 3) and strip.dtype == np.uint8
    png = encode_png(strip)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # decode the single IDAT back (filter byte 0 on every row)
    i = png.index(b"IDAT")
    n = int.from_bytes(png[i - 4:i], "big")
    raw = zlib.decompress(png[i + 4:i + 4 + n])
    rows = np.frombuffer(raw, np.uint8).reshape(20, 1 + 90 * 3)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(20, 90, 3), strip)


def test_index_json_is_switched_atomically(videos, ckpt, tmp_path):
    _build(videos, ckpt, tmp_path / "ix")
    (videos / "test00005.mp4").unlink()
    _build(videos, ckpt, tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    names = sorted(p.name for p in (tmp_path / "ix").iterdir() if p.is_file())
    assert meta["generation"] == 2 and names == ["embeddings-2.npy", "index.json", "videos-2.jsonl"]
