"""Two gloo processes under torchrun give the gradients of one process on the concatenated batch, and
through the CLI train (augmentation on) and index exactly what one process does."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_grads.py"


@pytest.mark.parametrize("method", ["vop-fc", "proj"])
def test_two_process_gradients_equal_single_process(tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, str(SCRIPT), str(single), method], check=True, env=env, timeout=300)
    multi = tmp_path / "multi.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(SCRIPT), str(multi), method], check=True, env=env, timeout=300, capture_output=True)
    a, b = torch.load(single), torch.load(multi)
    assert set(a) == set(b) and len(a) > 1
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), k
    # a per-rank loss (negatives only from the local half) would differ: make sure the test can tell
    assert a["__loss"].item() == pytest.approx(b["__loss"].item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the real entry points: `vop train` / `vop index` in one process vs under torchrun (2 gloo ranks)
# ----------------------------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun gives each rank one thread: the single run too
# what torchrun or gloo print when they cannot start processes here (no loopback, ports refused ...)
LAUNCH_FAILURE = re.compile(r"DistNetworkError|RendezvousConnectionError|RendezvousError|EADDRINUSE|Address already in use|"
                            r"connectFullMesh|Network is unreachable|Cannot assign requested address")


def _vop(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "vop.cli.main", *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vop.cli.main", *args], capture_output=True, text=True, env=ENV, timeout=300)
    if proc.returncode != 0 and (m := LAUNCH_FAILURE.search(proc.stderr)):
        pytest.skip(f"torchrun cannot start 2 gloo processes on this machine ({m.group(0)})")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_args(world, out, *extra):
    return ["train", "-q", f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", "model.method=vop-f",
            "model.frames=4", "model.image_size=32", "optim.batch_size=8", "optim.epochs=1", "optim.lr=5e-3",
            "eval.batch_size=16", "log_every=1", "data.augment=true", f"out_dir={out}", *extra]


@pytest.fixture(scope="module")
def single_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _vop(*_train_args(world, out, "data.num_workers=0"))
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_cli_train_two_processes_equal_one_with_augmentation(world, single_run, tmp_path):
    """Augmentation on: `vop train` under torchrun (2 ranks, 2 micro-batches each, a loader worker)
    gives every step's loss and the final prompts of one process (1 micro-batch, no worker)."""
    from safetensors.torch import load_file

    multi = tmp_path / "multi"
    _torchrun(*_train_args(world, multi, "optim.accumulate=2", "data.num_workers=1"))
    assert "augment: true" in (multi / "config.yaml").read_text()
    assert json.loads((multi / "versions.json").read_text())["world_size"] == 2
    a, b = _losses(single_run), _losses(multi)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (step, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5), step  # one generator per batch: ~2e-3 apart from step 1
    pa, pb = load_file(str(single_run / "last.safetensors")), load_file(str(multi / "last.safetensors"))
    assert set(pa) == set(pb) and len(pa) >= 3
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-5, rtol=0), (k, (pa[k] - pb[k]).abs().max().item())


def test_cli_index_two_processes_equal_one(world, single_run, tmp_path, capsys):
    """`vop index` sharded over 2 ranks writes the index of one process (same rows, bit-identical
    embeddings and thumbnails), and `vop search` gives the same results from both."""
    from vop.cli.main import main

    common = ["index", "--videos", str(world / "captions.jsonl"), "--split", "test", "--checkpoint",
              str(single_run / "last.safetensors"), "--image-size", "32", "--batch-size", "4", "-j", "0", "-q"]
    _vop(*common, "--out", str(tmp_path / "one"))
    proc = _torchrun(*common, "--out", str(tmp_path / "two"))
    assert "16 videos (16 encoded" in proc.stdout
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert one["last_run"]["world_size"] == 1 and two["last_run"]["encoded_per_rank"] == [8, 8]
    for k in ("created", "updated", "last_run"):
        one.pop(k), two.pop(k)
    assert one == two
    for name in one["files"].values():  # embeddings-1.npy, videos-1.jsonl: the same bytes
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    emb = np.load(tmp_path / "one" / one["files"]["embeddings"])
    assert emb.shape == (16, one["dim"]) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    thumbs = sorted(p.name for p in (tmp_path / "one" / "thumbs").iterdir())
    assert len(thumbs) == 16 and thumbs == sorted(p.name for p in (tmp_path / "two" / "thumbs").iterdir())
    assert all((tmp_path / "one" / "thumbs" / t).read_bytes() == (tmp_path / "two" / "thumbs" / t).read_bytes() for t in thumbs)

    queries = tmp_path / "q.txt"
    rows = [json.loads(x) for x in (world / "captions.jsonl").read_text().splitlines()]
    queries.write_text("\n".join([r["caption"] for r in rows if r["split"] == "test"][:6]) + "\n")
    results = []
    for d in ("one", "two"):
        capsys.readouterr()
        assert main(["search", str(tmp_path / d), "--queries", str(queries), "--json", "-k", "16"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert len(lines) == 6 and all(len(x["results"]) == 16 for x in lines)
        results.append([(x["query"], x["results"]) for x in lines])
    assert results[0] == results[1]
