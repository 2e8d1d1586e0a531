"""Search: CLI, HTTP API and the evaluation engine agree; prompt sets share one backbone; bad requests
get 4xx; a bounded local load test; the page in a real headless Chromium."""
import http.client
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

import vop
from vop.retrieval import SearchService, build_index, shares_backbone

HAVE_TINY_CLIP = resources.files("vop").joinpath("assets", "tiny-clip.safetensors").is_file()
BACKBONE = "tiny-clip" if HAVE_TINY_CLIP else "tiny"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The smoke world, a vop-fc checkpoint trained on it (prompt set A), an untrained vop-f one (B), and
    an index of the test split for each."""
    from vop.data import generate_world
    from vop.engine.config import RunConfig, load_config
    from vop.engine.trainer import train

    d = tmp_path_factory.mktemp("search")
    generate_world(d / "world", size="smoke")
    cfg = load_config(RunConfig, None, [
        f"data.root={d / 'world'}", "data.dataset=collection", f"model.backbone={BACKBONE}", "model.frames=4",
        "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "optim.epochs=2", f"out_dir={d / 'run'}",
        "model.method=vop-fc", "optim.lr=5e-3", "eval.every_epoch=false"])
    train(cfg, progress=False)
    ckpt_a = d / "run" / "last.safetensors"
    torch.manual_seed(0)
    ckpt_b = vop.save_checkpoint(vop.create_model("vop-f", BACKBONE, frames=4), d / "vop-f.safetensors",
                                 extra={"backbone": BACKBONE})
    for name, ck in (("A", ckpt_a), ("B", ckpt_b)):
        build_index(d / "world" / "captions.jsonl", ck, d / name, split="test", image_size=32, batch_size=16, progress=False)
    return {"dir": d, "world": d / "world", "ckpt_a": ckpt_a, "ckpt_b": ckpt_b, "ix_a": d / "A", "ix_b": d / "B"}


@pytest.fixture(scope="module")
def service(setup):
    return SearchService.load([f"A={setup['ix_a']}", f"B={setup['ix_b']}"])


@pytest.fixture(scope="module")
def server(service):
    """uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    uvicorn = pytest.importorskip("uvicorn", reason="pip install -e '.[serve]'")
    pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
    from vop.retrieval.web import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", timeout_keep_alive=30))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)
    sock.close()


def _get(base, path):
    """A raw GET (no client-side URL normalisation, so '../' reaches the server as sent)."""
    host, port = base.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, dict(r.getheaders()), body


def test_cli_api_and_engine_agree(setup, server, capsys):
    import httpx

    from vop.cli.main import main
    from vop.data import get_dataset
    from vop.engine.evaluate import evaluate
    from vop.engine.metrics import t2v_ranks

    ds = get_dataset("collection", setup["world"], "test", frames=4, size=32, train=False)
    gt = [ds.videos[i] for i in ds.text_to_video.tolist()]
    qfile = setup["dir"] / "queries.txt"
    qfile.write_text("\n".join(ds.captions) + "\n")
    capsys.readouterr()
    assert main(["search", str(setup["ix_a"]), "--queries", str(qfile), "-k", "5", "--json"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["query"] for c in cli] == ds.captions
    with httpx.Client(base_url=server, timeout=30) as client:
        api = [client.get("/api/search", params={"q": c, "k": 5, "index": "A"}).json() for c in ds.captions]
    model = vop.load_checkpoint(setup["ckpt_a"], BACKBONE)
    out = evaluate(model, ds, batch_size=16)
    hit_cli = [g in [h["id"] for h in c["results"]] for g, c in zip(gt, cli)]
    hit_api = [g in [h["id"] for h in a["results"]] for g, a in zip(gt, api)]
    hit_eval = (t2v_ranks(out.sim, ds.text_to_video) <= 5).tolist()
    assert hit_cli == hit_api == hit_eval
    r5_cli, r5_api = 100.0 * np.mean(hit_cli), 100.0 * np.mean(hit_api)
    assert r5_cli == r5_api == out.metrics["t2v"]["R5"]
    for c, a in zip(cli, api):  # same ranking and scores, video by video
        assert [h["id"] for h in c["results"]] == [h["id"] for h in a["results"]]
        assert np.allclose([h["score"] for h in c["results"]], [h["score"] for h in a["results"]], atol=1e-5)
    print(f"\nsynthetic test split, {len(gt)} captions: R@5 = {r5_cli:.2f} (CLI = API = engine), backbone {BACKBONE}")


@pytest.mark.skipif(not HAVE_TINY_CLIP, reason="needs the pretrained tiny CLIP (src/vop/assets/tiny-clip.safetensors); "
                    "on the random tiny backbone a 2-epoch prompt is at chance")
def test_trained_checkpoint_beats_chance(setup):
    from vop.retrieval import Searcher

    s = Searcher.open(setup["ix_a"])
    from vop.data import get_dataset

    ds = get_dataset("collection", setup["world"], "test", frames=4, size=32, train=False)
    res = s.search(ds.captions, k=5)
    r5 = np.mean([ds.videos[g] in [h["id"] for h in r] for g, r in zip(ds.text_to_video.tolist(), res)])
    assert r5 > 5 / len(ds.videos)


def test_prompt_sets_share_one_backbone(service, setup):
    a, b = (service.get(n).searcher for n in ("A", "B"))
    assert a.shared and b.shared and len(service.pool.clips) == 1
    storage = lambda clip: {p.untyped_storage().data_ptr() for p in clip.parameters()}  # noqa: E731
    pool_clip = next(iter(service.pool.clips.values()))
    assert storage(a.model.clip) == storage(b.model.clip) == storage(pool_clip)  # one copy of CLIP's weights
    own = lambda m: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("clip."))  # noqa: E731
    clip = sum(p.numel() for p in a.model.clip.parameters())
    assert own(a.model) < clip and own(b.model) < clip  # each prompt set adds only its own tensors
    assert a.model.name == "vop-fc" and b.model.name == "vop-f"
    # a method that tunes CLIP tensors owns copies of those and shares the rest; a whole-model checkpoint does not share
    torch.manual_seed(0)
    bias = vop.save_checkpoint(vop.create_model("bias", "tiny", frames=4), setup["dir"] / "bias.safetensors")
    full = vop.save_checkpoint(vop.create_model("full", "tiny", frames=4), setup["dir"] / "full.safetensors")
    assert shares_backbone(vop.read_checkpoint_meta(bias)) and not shares_backbone(vop.read_checkpoint_meta(full))
    assert shares_backbone(vop.read_checkpoint_meta(setup["ckpt_b"]))
    # switching prompt set per request reloads nothing
    before = {id(m) for m in service.models()}
    ra, rb = service.search("a circle moves left", 5, "A"), service.search("a circle moves left", 5, "B")
    assert ra["method"] == "vop-fc" and rb["method"] == "vop-f" and {id(m) for m in service.models()} == before


def test_bad_requests_get_4xx(server, setup):
    cases = {
        "/api/search?q=": 400, "/api/search?q=%20%20": 400, "/api/search": 400,
        "/api/search?q=" + "a" * 10_000: 400, "/api/search?q=%FF%FEcircle": 400, "/api/search?q=circle%C3": 400,
        "/api/search?q=circle&index=nope": 404, "/api/search?q=circle&k=0": 400, "/api/search?q=circle&k=abc": 400,
        "/api/search?q=circle&k=1000": 400, "/api/search?q=a%00b": 400,
        "/thumb/A/../../index.json": 404, "/thumb/A/..%2F..%2Findex.json": 404, "/video/A/../../../etc/passwd": 404,
        "/video/A/%2e%2e%2f%2e%2e%2fetc%2fpasswd": 404, "/video/A/-1": 404, "/video/A/16": 404, "/video/nope/0": 404,
        "/thumb/A/1e3": 404, "/../../etc/passwd": 404, "/static/../index.json": 404,
    }
    for path, want in cases.items():
        status, headers, body = _get(server, path)
        assert status == want, (path, status, body[:200])
        assert "error" in json.loads(body), path
    status, headers, body = _get(server, "/api/search?q=" + "a" * 10_000)
    assert "too long" in json.loads(body)["error"]
    # the good ones
    status, headers, body = _get(server, "/api/search?q=a%20red%20circle&k=3&index=B")
    assert status == 200 and len(json.loads(body)["results"]) == 3
    status, headers, body = _get(server, "/thumb/A/0")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    c = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    c.request("GET", "/video/A/0", headers={"Range": "bytes=0-99"})
    r = c.getresponse()
    assert r.status == 206 and len(r.read()) == 100 and r.getheader("content-type") == "video/mp4"
    c.close()
    status, _, body = _get(server, "/")
    assert status == 200 and b"<select id=\"index\"" in body


def test_local_load(server, setup):
    """320 distinct queries, 16 at a time, to 127.0.0.1 only: no error; p50/p99 reported."""
    import httpx

    from vop.data import get_dataset

    caps = get_dataset("collection", setup["world"], "test", frames=4, size=32).captions
    queries = [(f"{caps[i % len(caps)]} {i}", "AB"[i % 2]) for i in range(320)]
    lat, codes = [], []

    def one(client, q, ix):
        t = time.perf_counter()
        r = client.get("/api/search", params={"q": q, "k": 10, "index": ix})
        lat.append(time.perf_counter() - t)
        codes.append(r.status_code)
        return r.json()

    with httpx.Client(base_url=server, timeout=30, limits=httpx.Limits(max_connections=16)) as client:
        with ThreadPoolExecutor(16) as pool:
            out = list(pool.map(lambda a: one(client, *a), queries))
    assert codes == [200] * len(queries) and all(len(o["results"]) == 10 for o in out)
    p50, p99 = np.percentile(lat, 50) * 1000, np.percentile(lat, 99) * 1000
    print(f"\nload: {len(queries)} queries at concurrency 16: p50 {p50:.1f} ms, p99 {p99:.1f} ms")


def test_page_in_headless_chromium(server, setup, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from vop.data import get_dataset

    caption = get_dataset("collection", setup["world"], "test", frames=4, size=32).captions[3]
    shots = Path(os.environ.get("VOP_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_function("document.querySelectorAll('#index option').length === 2")
            page.fill("#q", caption)
            page.press("#q", "Enter")
            page.wait_for_function("document.querySelector('#results').dataset.index === 'A'")
            assert page.locator("#results .result").count() == 10
            page.wait_for_function("[...document.querySelectorAll('.strip')].slice(0, 3).every(i => i.complete && i.naturalWidth > 0)")
            scores_a = page.locator("#results .result .score").all_inner_texts()
            assert "index=A" in page.url and "top 10 of 16 videos" in page.inner_text("#status")
            page.select_option("#index", "B")
            page.wait_for_function("document.querySelector('#results').dataset.index === 'B'")
            assert page.locator("#results .result").count() == 10 and "vop-f" in page.inner_text("#status")
            scores_b = page.locator("#results .result .score").all_inner_texts()
            assert scores_b != scores_a  # another prompt set, other scores
            page.locator("#results .result").first.click()
            page.wait_for_selector("#player:not([hidden])")
            assert page.get_attribute("#video", "src") == "/video/B/" + page.locator("#results .result").first.get_attribute("data-row")
            page.wait_for_function("[...document.querySelectorAll('.strip')].every(i => i.complete && i.naturalWidth > 0)")
            shot = shots / "vop-search-page.png"
            page.screenshot(path=str(shot), full_page=True)
            # an empty query is refused with a message
            page.fill("#q", "   ")
            page.press("#q", "Enter")
            assert "type a query" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")


def test_cli_text_output_and_serve_errors(setup, capsys):
    from vop.cli.main import main

    capsys.readouterr()
    assert main(["search", str(setup["ix_a"]), "a red circle moves left", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and [ln.split()[0] for ln in lines] == ["1", "2", "3"] and lines[0].endswith(".mp4")
    assert main(["search", str(setup["ix_a"])]) == 2  # neither a query nor --queries
    assert main(["serve", str(setup["dir"] / "nope")]) == 2
    assert "not a vop index" in capsys.readouterr().err
