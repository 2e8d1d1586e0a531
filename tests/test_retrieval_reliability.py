"""Index and server reliability (issue 13): `vop index --frames` refused before any work, a new index
appears only complete, Unicode digits in video rows, the Host header (DNS rebinding), oversized queries.
Integrity (issue 23), through the `vop` console script, for a dual-encoder and a pairwise (cma) index:
damaged embeddings / video list / index.json are refused naming the file and the rebuild command, NaN is
never served (not even with --no-verify) and never enters an index, a changed backbone file is noticed,
a model of the other kind is refused both ways, k is checked alike everywhere."""
from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import vop
from vop.cli.main import main
from vop.retrieval import SearchService, build_index
from vop.retrieval.index import building_path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return vop.save_checkpoint(vop.create_model("vop-f", "tiny", frames=4), tmp_path_factory.mktemp("ck") / "f.safetensors",
                               extra={"backbone": "tiny"})


def test_index_frames_refused_before_any_work(world, ckpt, tmp_path, monkeypatch, capsys):
    import vop.retrieval.build as index

    def no_listing(*a, **k):
        raise AssertionError("videos were listed before the frame count was checked")

    monkeypatch.setattr(index, "list_sources", no_listing)
    out = tmp_path / "ix"
    assert main(["index", "--videos", str(world / "videos" / "test"), "--checkpoint", str(ckpt), "--out", str(out),
                 "--frames", "8", "--image-size", "32", "-j", "0", "-q"]) == 2
    assert "trained with 4 frames per video and its frame position embedding" in capsys.readouterr().err
    assert not out.exists() and not building_path(out).exists()


def test_failed_new_index_leaves_no_folder(world, ckpt, tmp_path, monkeypatch):
    from vop.methods.base import VideoTextModel

    def boom(self, video):
        raise RuntimeError("out of memory (simulated)")

    out = tmp_path / "ix"
    with monkeypatch.context() as m:
        m.setattr(VideoTextModel, "encode_video", boom)
        with pytest.raises(RuntimeError, match="simulated"):
            build_index(world / "videos" / "test", ckpt, out, image_size=32, progress=False)
    assert not out.exists() and not building_path(out).exists()
    # an empty folder made for the index is fine; it is filled only once the index is complete
    out.mkdir()
    r = build_index(world / "videos" / "test", ckpt, out, image_size=32, progress=False)
    assert r.total == 16 and (out / "index.json").is_file() and not building_path(out).exists()


# -- the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(world, ckpt, tmp_path_factory):
    """`vop serve`'s own uvicorn configuration (server_config), on a free 127.0.0.1 port, in a thread."""
    uvicorn = pytest.importorskip("uvicorn", reason="pip install -e '.[serve]'")
    pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
    from vop.retrieval.web import server_config

    ix = tmp_path_factory.mktemp("srv") / "ix"
    build_index(world / "captions.jsonl", ckpt, ix, split="test", image_size=32, progress=False)
    service = SearchService.load([f"A={ix}"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(server_config(service, "127.0.0.1", port, "warning", allowed_hosts=["videos.lan"]))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    t.join(10)
    sock.close()


def _get(port, path, host=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path, headers={"Host": host} if host else {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, json.loads(body) if r.getheader("content-type", "").startswith("application/json") else body


def test_unicode_digits_are_not_rows(server):
    for path in ("/video/A/%C2%B2", "/thumb/A/%C2%B2", "/video/A/%D9%A3", "/thumb/A/%EF%BC%91", "/thumb/A/" + "1" * 5000):
        status, body = _get(server, path)
        assert status == 404 and "has no video" in body["error"], (path, status, body)
    assert _get(server, "/thumb/A/1")[0] == 200


def test_host_header_is_checked(server):
    q = "/api/search?q=a%20circle&k=2"
    for host in (f"127.0.0.1:{server}", f"localhost:{server}", f"LOCALHOST.:{server}", f"[::1]:{server}", "videos.lan"):
        assert _get(server, q, host)[0] == 200, host
    status, body = _get(server, q, f"attacker.example:{server}")  # what a DNS-rebinding page would send
    assert status == 400 and "'attacker.example' is not served here" in body["error"] and "--allowed-host" in body["error"]
    assert _get(server, "/thumb/A/0", "attacker.example")[0] == 400  # files too, not only the API


def test_oversized_query_gets_413(server):
    status, body = _get(server, "/api/search?q=" + "a" * 1_000_000)
    assert status == 413 and "query string too large (1000002 bytes" in body["error"]
    status, body = _get(server, "/api/search?q=" + "a" * 2000)  # long but sane: the service's own 400
    assert status == 400 and "too long" in body["error"]


def test_default_allowed_hosts():
    from vop.retrieval.web import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ["localhost"]
    assert default_allowed_hosts("my-box") == ["localhost", "my-box"]
    assert socket.gethostname().lower() in default_allowed_hosts("0.0.0.0")


# -- integrity (issue 23): damaged files are named, never served; both kinds of index -----------------------

KINDS = {"dual": "vop-f", "pairwise": "cma"}


def vop_script() -> str:

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("vop", path=path)
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return exe


def run_all(*commands):
    """Run `vop` command lines at once (subprocesses, 2 at a time); their CompletedProcess, in order."""

    def one(args):
        return subprocess.run([vop_script(), *map(str, args)], capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, commands))


def strict_json(text: str):
    """JSON as the standard has it: NaN / Infinity are refused."""
    def no(name):
        raise ValueError(f"{name} in the output")
    return json.loads(text, parse_constant=no)


def refused(r, *named):
    """Exit 2, an `error:` line (the last, after any warning) naming what is in ``named``, no traceback,
    nothing on stdout."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, out)
    err = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out and err.startswith("error: "), out
    for s in named:
        assert s in err, (s, err)
    assert r.stdout == "", r.stdout
    return err


@pytest.fixture(scope="module")
def kinds(world, tmp_path_factory):
    """A dual-encoder (vop-f) and a pairwise (cma) index of the 16 test videos, with their checkpoints."""
    d = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind, method in KINDS.items():
        torch.manual_seed(0)
        ck = vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), d / f"{method}.safetensors",
                                 extra={"backbone": "tiny"})
        build_index(world / "videos" / "test", ck, d / kind, image_size=32, progress=False)
        out[kind] = (d / kind, ck)
    return out


def _copies(kinds, tmp_path):

    return {k: shutil.copytree(ix, tmp_path / k) for k, (ix, _) in kinds.items()}


def _flip(path, offset, bit=1):
    b = bytearray(path.read_bytes())
    b[offset] ^= bit
    path.write_bytes(bytes(b))


def _data_offset(path):

    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def _nan_row3(path):

    a = np.load(path)
    a[3].flat[5] = np.nan
    np.save(path, a)


def _strip_checksums(ix):
    """index.json as vop wrote it before checksums (an older index)."""
    meta = json.loads((ix / "index.json").read_text())
    del meta["checksums"], meta["model"]["files"]
    (ix / "index.json").write_text(json.dumps(meta))


EMB = "embeddings-1.npy"
DAMAGE = {  # name: (change to the index folder, what the message says besides the file name)
    "empty": (lambda ix: (ix / EMB).write_bytes(b""), "empty (0 bytes)"),
    "header bit": (lambda ix: _flip(ix / EMB, 20, 0x40), "damaged header"),
    "header length": (lambda ix: _flip(ix / EMB, 8, 0x40), "damaged header"),  # numpy's parser: tokenize.TokenError
    "data bit": (lambda ix: _flip(ix / EMB, _data_offset(ix / EMB) + 401), "SHA-256 differs"),  # finite: only the checksum sees it
    "truncated": (lambda ix: (ix / EMB).write_bytes((ix / EMB).read_bytes()[:-100]), "when the index was written"),
    "nan": (lambda ix: _nan_row3(ix / EMB), "SHA-256 differs"),
    "videos list": (lambda ix: _flip(ix / "videos-1.jsonl", 30), "SHA-256 differs"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_embeddings_are_refused_naming_the_file(kinds, tmp_path, damage):
    change, says = DAMAGE[damage]
    ix = _copies(kinds, tmp_path)
    for p in ix.values():
        change(p)
    file = "videos-1.jsonl" if damage == "videos list" else EMB
    for kind, r in zip(ix, run_all(*[["search", p, "a red circle", "--json"] for p in ix.values()])):
        err = refused(r, f"{ix[kind] / file}: ", says, "the index is damaged: rebuild it: vop index --videos ",
                      f"--checkpoint {kinds[kind][1]}", f"--out {ix[kind]} --rebuild")


def test_nan_never_served_even_unverified(kinds, tmp_path):
    """--no-verify skips the checksums, yet a NaN embedding is refused when it would be ranked; an older
    index (no checksums) is scanned for NaN/inf when it opens, and otherwise opens with one warning."""
    ix = _copies(kinds, tmp_path)
    for p in ix.values():
        _nan_row3(p / EMB)
    rs = run_all(*[["search", p, "a red circle", "--json", "-k", "16", "--no-verify"] for p in ix.values()])
    for kind, r in zip(ix, rs):
        refused(r, f"{ix[kind] / EMB}: video 'test00003.mp4' (row 3) scored nan", "--no-verify", "--rebuild")
    for p in ix.values():
        _strip_checksums(p)
    for kind, r in zip(ix, run_all(*[["search", p, "a red circle", "--json"] for p in ix.values()])):
        refused(r, f"{ix[kind] / EMB}: row 3 (video 'test00003.mp4') holds NaN or inf values", "--rebuild")
    # an older index, undamaged: searched, with one warning line; `vop index` on it again adds the checksums

    old = shutil.copytree(kinds["dual"][0], tmp_path / "old")
    _strip_checksums(old)
    r, = run_all(["search", old, "a red circle", "--json", "-k", "16"])
    assert r.returncode == 0 and len(strict_json(r.stdout)["results"]) == 16
    warning = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warning) == 1 and "carry no checksums" in warning[0] and str(old) in warning[0], r.stderr
    src = json.loads((old / "index.json").read_text())["source"]["videos"]
    r, = run_all(["index", "--videos", src, "--checkpoint", kinds["dual"][1], "--out", old, "--image-size", "32", "-j", "0", "-q"])
    assert r.returncode == 0 and "(0 encoded, 16 unchanged" in r.stdout, r.stdout + r.stderr
    meta = json.loads((old / "index.json").read_text())
    assert set(meta["checksums"]) == {"embeddings-2.npy", "videos-2.jsonl"} and meta["model"]["files"][0]["role"] == "checkpoint"


INDEX_JSON = {  # name: (change to index.json, what the message names)
    "renamed key": (lambda s: s.replace('"dim"', '"dIm"', 1), "field 'dim' is <missing>"),
    "wrong type": (lambda s: s.replace('"count": 16', '"count": "16"', 1), "field 'count' is '16', expected an integer >= 0"),
    "model key": (lambda s: s.replace('"checkpoint_sha256"', '"checkpoint_sha"', 1), "field 'model.checkpoint_sha256' is missing"),
    "path in files": (lambda s: s.replace('"embeddings": "embeddings-1.npy"', '"embeddings": "../../etc/passwd"', 1),
                      "field 'files.embeddings'"),
    "not JSON": (lambda s: s[: len(s) // 2], "not valid JSON"),
    "NaN": (lambda s: s.replace('"dim": 64', '"dim": NaN', 1), "not valid JSON"),
}


@pytest.mark.parametrize("damage", list(INDEX_JSON))
def test_damaged_index_json_is_refused(kinds, tmp_path, damage):
    change, says = INDEX_JSON[damage]
    ix = _copies(kinds, tmp_path)
    for p in ix.values():
        (p / "index.json").write_text(change((p / "index.json").read_text()))
    for kind, r in zip(ix, run_all(*[["search", p, "a red circle"] for p in ix.values()])):
        refused(r, f"{ix[kind] / 'index.json'}: ", says, "rebuild it: vop index", "--rebuild")


def test_rebuild_command_repairs_a_damaged_index(kinds, tmp_path):
    """The command the message gives works, also when index.json itself is damaged."""

    ix = _copies(kinds, tmp_path)["pairwise"]
    _flip(ix / EMB, _data_offset(ix / EMB) + 7)
    r, = run_all(["search", ix, "a red circle"])
    cmd = refused(r).split("rebuild it: ", 1)[1].strip()
    (ix / "index.json").write_text("{")  # now index.json too
    r, = run_all(*[shlex.split(cmd)[1:] + ["-j", "0", "-q"]])
    assert r.returncode == 0 and "16 videos (16 encoded" in r.stdout, r.stdout + r.stderr
    r, = run_all(["search", ix, "a red circle", "--json", "-k", "3"])
    assert r.returncode == 0 and [h["rank"] for h in strict_json(r.stdout)["results"]] == [1, 2, 3]


def test_k_is_checked_alike_for_every_kind_and_entry_point(kinds, tmp_path):
    """k: an integer >= 1 everywhere; more than the index holds gives every video, ranked, for exact,
    FAISS and pairwise search alike."""

    from vop.errors import ConfigError
    from vop.retrieval import Searcher
    from vop.retrieval.service import RequestError

    rs = run_all(*[["search", ix, "a red circle", "-k", k] for ix, _ in kinds.values() for k in ("0", "-1")],
                 *[["search", ix, "a red circle", "-k", "1000", "--json"] for ix, _ in kinds.values()])
    for r in rs[:4]:
        refused(r, "-k must be an integer >= 1")
    for r in rs[4:]:
        assert r.returncode == 0, r.stderr
        res = strict_json(r.stdout)["results"]
        assert [h["rank"] for h in res] == list(range(1, 17)) and len({h["id"] for h in res}) == 16
    searchers = {k: Searcher.open(ix) for k, (ix, _) in kinds.items()}
    pytest.importorskip("faiss", reason="pip install -e '.[index]' (faiss-cpu)")
    fa = tmp_path / "faiss"
    build_index(_source(kinds["dual"][0]), kinds["dual"][1], fa, image_size=32, progress=False, faiss="hnsw")
    searchers["faiss"] = Searcher.open(fa)
    for name, s in searchers.items():
        for bad in (0, -1, 2.5, True, "3", None):
            with pytest.raises(ConfigError, match="k must be an integer >= 1"):
                s.search(["a red circle"], k=bad)
        every = s.search(["a red circle"], k=1000)[0]
        assert [h["rank"] for h in every] == list(range(1, 17)) and len({h["row"] for h in every}) == 16, name
        scores = [h["score"] for h in every]
        assert scores == sorted(scores, reverse=True), name
        q = s.encode(["a red circle"])
        assert s.rank(q, 16)[1].shape == (1, 16)
        with pytest.raises(ConfigError, match="NaN or inf"):
            s.index.search(np.full((1, 64), np.nan, np.float32), 3, model=s.model)
    # the FAISS file is checksummed too
    faiss_file = fa / json.loads((fa / "index.json").read_text())["files"]["faiss"]
    _flip(faiss_file, faiss_file.stat().st_size // 2)
    r, = run_all(["search", fa, "a red circle"])
    refused(r, f"{faiss_file}: its SHA-256 differs", "--rebuild")
    for bad in ("0", "-1", "101", "abc", "\u0663", "1.0", "", 0, 101):
        with pytest.raises(RequestError, match="k must be"):
            SearchService.check_k(bad)
    assert SearchService.check_k("100") == 100 and SearchService.check_k(" 7") == 7


def _source(ix):
    return json.loads((ix / "index.json").read_text())["source"]["videos"]


def test_model_kind_mismatch_is_refused_both_ways(kinds):

    from vop.errors import ConfigError
    from vop.retrieval import VideoIndex

    (dual, f), (pair, cma) = kinds["dual"], kinds["pairwise"]
    a, b = run_all(["search", dual, "a red circle", "--checkpoint", cma], ["search", pair, "a red circle", "--checkpoint", f])
    refused(a, f"{dual}: a dual-encoder index", f"the checkpoint {cma} (cma) is a pairwise model", "cannot be mixed",
            f"vop index --videos {_source(dual)} --checkpoint {cma} --out {dual} --rebuild")
    refused(b, f"{pair}: a pairwise index", f"the checkpoint {f} (vop-f) is a dual-encoder model", "cannot be mixed")
    # the Python API: a model given with an index of the other kind is refused, never ignored
    q = np.ones((1, 64), np.float32) / 8
    for ix, other in ((dual, cma), (pair, f)):
        with pytest.raises(ConfigError, match="cannot be mixed"):
            VideoIndex.open(ix).search(q, 3, model=vop.load_checkpoint(other).eval())


@pytest.fixture(scope="module")
def on_file(world, tmp_path_factory):
    """A vop-f checkpoint on a backbone weights *file*, and its index."""
    from vop.backbone.checkpoint import save_clip

    d = tmp_path_factory.mktemp("bbfile")
    save_clip(vop.build_clip("tiny", seed=0), d / "clip.safetensors")
    torch.manual_seed(0)
    ck = vop.save_checkpoint(vop.create_model("vop-f", d / "clip.safetensors", frames=4), d / "f.safetensors",
                             backbone=d / "clip.safetensors")
    build_index(world / "videos" / "test", ck, d / "ix", image_size=32, progress=False)
    return d


def _nudge_clip(path):
    """Change one weight the backbone fingerprint does not sample (same size, same architecture)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    sd["token_embedding.weight"].view(-1)[1] += 1e-3
    save_file(sd, str(path), metadata=meta)


def test_changed_backbone_file_is_refused(on_file, tmp_path):
    """The index records size and SHA-256 of the backbone file: a changed one is refused by `vop search`
    and `vop serve` (the weights fingerprint samples 4096 values per tensor and cannot see this one)."""

    from vop.backbone.checkpoint import weights_fingerprint

    bb, ix = on_file / "clip.safetensors", on_file / "ix"
    rec = next(f for f in json.loads((ix / "index.json").read_text())["model"]["files"] if f["role"] == "backbone")
    assert rec["path"] == str(bb.resolve()) and rec["size"] == bb.stat().st_size
    saved = shutil.copy2(bb, tmp_path / "clip.orig")
    try:
        before = weights_fingerprint(vop.load_clip(bb))
        _nudge_clip(bb)
        assert weights_fingerprint(vop.load_clip(bb)) == before  # what was checked before: blind to it
        a, b, c = run_all(["search", ix, "a red circle"], ["serve", ix, "--port", "1"],
                          ["search", ix, "a red circle", "--no-verify"])  # mtime changed: hashed anyway
        for r in (a, b, c):
            refused(r, f"{bb.resolve()}: changed since the index {ix} was built", "SHA-256 differs",
                    "restore the file, or rebuild the index with it: vop index", "--rebuild")
        os.utime(bb, ns=(rec["mtime_ns"], rec["mtime_ns"]))  # --no-verify trusts size + mtime (documented)
        r, = run_all(["search", ix, "a red circle", "--no-verify"])
        assert r.returncode == 0, r.stderr
        bb.unlink()
        r, = run_all(["search", ix, "a red circle"])
        refused(r, f"{bb.resolve()}: missing: the backbone file the index {ix} was built with", "--backbone")
    finally:
        shutil.copy2(saved, bb)
    r, = run_all(["search", ix, "a red circle", "-k", "2"])
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2


def test_changed_modelscope_backbone_is_refused(world, tmp_path):
    """A ModelScope folder's ViT-B-32.pt changed after indexing (within the tolerance of the prompt
    file's CLIP copies) is refused, naming it; so is a changed weights file."""

    sys.path.insert(0, str(Path(__file__).parent))
    from test_methods_modelscope import make_folder

    folder = make_folder(tmp_path / "cv_vit-b32_retrieval_vop")
    build_index(world / "videos" / "test", folder, tmp_path / "ix", progress=False)
    roles = [f["role"] for f in json.loads((tmp_path / "ix" / "index.json").read_text())["model"]["files"]]
    assert roles == ["checkpoint config", "checkpoint weights", "backbone"]
    sd = torch.load(folder / "ViT-B-32.pt", weights_only=True)
    sd["token_embedding.weight"].view(-1)[1] *= 1 + 1e-5
    torch.save(sd, folder / "ViT-B-32.pt")
    vop.load_checkpoint(folder)  # still loads: the change is within the copies' tolerance
    r, = run_all(["search", tmp_path / "ix", "a red circle"])
    refused(r, f"{(folder / 'ViT-B-32.pt').resolve()}: changed since the index {tmp_path / 'ix'} was built", "--rebuild")


def test_nonfinite_embeddings_never_enter_an_index(world, tmp_path, monkeypatch):
    """A video whose embedding is NaN/inf is listed as failed (named, with the reason), like an
    unreadable one; --retry-failed tries it again."""

    import vop.runtime as runtime
    from vop.retrieval import VideoIndex

    torch.manual_seed(0)
    ck = vop.save_checkpoint(vop.create_model("cma", "tiny", frames=4), tmp_path / "cma.safetensors", extra={"backbone": "tiny"})
    real = runtime.embed_video_batch

    def one_nan(*a, **k):
        out = real(*a, **k)
        out[0].view(-1)[0] = float("inf") if out.shape[0] % 2 else float("nan")
        return out

    monkeypatch.setattr(runtime, "embed_video_batch", one_nan)
    r = build_index(world / "videos" / "test", ck, tmp_path / "ix", image_size=32, batch_size=5, progress=False)
    assert r.total == 12 and sorted(r.failed) == ["test00000.mp4", "test00005.mp4", "test00010.mp4", "test00015.mp4"]
    assert all("non-finite embedding (NaN or inf)" in e for e in r.failed.values())
    ix = VideoIndex.open(tmp_path / "ix")
    assert len(ix) == 12 and np.isfinite(ix.emb).all() and len(ix.meta["failed"]) == 4
    monkeypatch.setattr(runtime, "embed_video_batch", real)
    assert build_index(world / "videos" / "test", ck, tmp_path / "ix", image_size=32, progress=False).total == 12
    r = build_index(world / "videos" / "test", ck, tmp_path / "ix", image_size=32, progress=False, retry_failed=True)
    assert (r.total, r.encoded, r.failed) == (16, 4, {})


def test_nonfinite_query_and_service_answers(world, kinds, tmp_path):
    """A model giving NaN for a query: `vop search` names its checkpoint. A NaN found while serving
    (index opened with verify=False) is a 500 with the message, in valid JSON."""

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    ck = vop.save_checkpoint(vop.create_model("vop", "tiny", frames=4), tmp_path / "vop.safetensors", extra={"backbone": "tiny"})
    build_index(world / "videos" / "test", ck, tmp_path / "ix", image_size=32, progress=False)
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(ck))
    sd["text_prompts.tokens"].view(-1)[0] = float("nan")
    save_file(sd, str(ck), metadata=meta)
    ix = tmp_path / "ix"
    meta_ix = json.loads((ix / "index.json").read_text())
    for rec in meta_ix["model"]["files"]:  # the prompts changed on purpose: the index is told so
        rec.update(size=ck.stat().st_size, sha256=vop.retrieval.index.sha256_file(ck))
    meta_ix["model"]["checkpoint_sha256"] = vop.retrieval.index.sha256_file(ck)
    (ix / "index.json").write_text(json.dumps(meta_ix))
    r, = run_all(["search", ix, "a red circle", "--json"])
    refused(r, f"{ck}: the model gave a non-finite (NaN/inf) embedding for the query 'a red circle'")

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vop.retrieval.web import create_app

    bad = shutil.copytree(kinds["dual"][0], tmp_path / "bad")
    _nan_row3(bad / EMB)
    with pytest.raises(vop.errors.DataError, match="SHA-256 differs"):
        SearchService.load([str(bad)])
    svc = SearchService.load([f"bad={bad}"], verify=False)
    client = TestClient(create_app(svc, allowed_hosts=["testserver"]))
    r = client.get("/api/search", params={"q": "a red circle", "k": "16"})
    body = strict_json(r.text)
    assert r.status_code == 500 and "video 'test00003.mp4' (row 3) scored nan" in body["error"]
    r = client.get("/api/search", params={"q": "a red circle", "k": "0"})
    assert r.status_code == 400 and "k must be" in strict_json(r.text)["error"]
