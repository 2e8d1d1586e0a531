"""Index and server reliability (issue 13): `vop index --frames` refused before any work, a new index
appears only complete, Unicode digits in video rows, the Host header (DNS rebinding), oversized queries."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

import vop
from vop.cli.main import main
from vop.retrieval import SearchService, build_index
from vop.retrieval.index import building_path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vop.data import generate_world

    d = tmp_path_factory.mktemp("world")
    generate_world(d, size="smoke")
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return vop.save_checkpoint(vop.create_model("vop-f", "tiny", frames=4), tmp_path_factory.mktemp("ck") / "f.safetensors",
                               extra={"backbone": "tiny"})


def test_index_frames_refused_before_any_work(world, ckpt, tmp_path, monkeypatch, capsys):
    import vop.retrieval.index as index

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
