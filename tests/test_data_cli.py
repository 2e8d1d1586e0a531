"""`vop data synth | verify | cache | info`: exit codes, manifest content."""
from __future__ import annotations

import importlib.util
import json

import pytest
import typer
from typer.testing import CliRunner

from vop.cli.data import register
from vop.data import get_dataset


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def world(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "world"
    r = cli("data", "synth", "--out", out, "--size", "smoke", "--seed", "0")
    assert r.exit_code == 0, r.output
    assert "train 16 videos / 48 captions" in r.output
    return out


def test_verify_clean_then_broken(cli, world, tmp_path):
    r = cli("data", "verify", "--dataset", "collection", "--root", world, "--strict")
    assert r.exit_code == 0, r.output
    assert "collection all: 68 samples, 36 videos, 0 missing, 0 undecodable" in r.output
    manifest = json.loads((world / "vop-verify-collection-all.json").read_text())
    assert (manifest["videos"], manifest["ok"], manifest["missing"], manifest["undecodable"]) == (36, 36, [], [])
    (world / "vop-verify-collection-all.json").unlink()

    # break one test video, delete another
    broken, gone = world / "videos/test/test00000.mp4", world / "videos/test/test00003.mp4"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    gone.rename(tmp_path / "kept.mp4")
    try:
        out = tmp_path / "m.json"
        r = cli("data", "verify", "-d", "collection", "-r", world, "--split", "test", "--manifest", out)
        assert r.exit_code == 0, r.output
        assert "collection test: 16 samples, 16 videos, 1 missing, 1 undecodable" in r.output
        m = json.loads(out.read_text())
        assert m["missing"] == [{"video_id": "videos/test/test00003.mp4", "path": str(gone)}]
        assert [b["video_id"] for b in m["undecodable"]] == ["videos/test/test00000.mp4"]
        assert str(broken) in m["undecodable"][0]["error"] and m["ok"] == 14
        r = cli("data", "verify", "-d", "collection", "-r", world, "-s", "test", "--manifest", out, "--strict")
        assert r.exit_code == 1

        # the default manifest inside the root is picked up by get_dataset
        assert cli("data", "verify", "-d", "collection", "-r", world, "-s", "test").exit_code == 0
        ds = get_dataset("collection", world, "test")
        assert len(ds) == 14 and set(ds.dropped) == {"videos/test/test00000.mp4", "videos/test/test00003.mp4"}
    finally:
        broken.write_bytes(data)
        (tmp_path / "kept.mp4").rename(gone)
        (world / "vop-verify-collection-test.json").unlink(missing_ok=True)


def test_cache_and_info(cli, world, tmp_path):
    r = cli("data", "cache", "-d", "collection", "-r", world, "-s", "val", "--out", tmp_path / "c", "--frames", "4",
            "--size", "32")
    assert r.exit_code == 0, r.output
    assert "4 written, 0 already cached, 0 failed" in r.output
    assert len(list((tmp_path / "c" / "f4_s32").glob("*.npz"))) == 4
    r = cli("data", "info", world / "videos/val/val00000.mp4")
    assert r.exit_code == 0 and "16 frames, 8.000 fps, 2.00 s, 64x64, h264" in r.output


def test_cache_for_a_backbone_resizes_as_it_was_trained(cli, world, tmp_path):
    """--backbone: frames resized as the architecture's record says (PE-Core: squashed, bilinear), in a folder of
    their own; a dataset of that backbone's preprocessing reads them back, CLIP's does not see them."""
    from vop.backbone.config import get_arch
    from vop.data import resize_frames
    from vop.data.decode import load_frames

    r = cli("data", "cache", "-d", "collection", "-r", world, "-s", "val", "--out", tmp_path / "c", "--frames", "4",
            "--size", "32", "--backbone", "pe-core-tiny")
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "c" / "f4_s32_squash-bilinear").glob("*.npz"))
    assert len(files) == 4 and not (tmp_path / "c" / "f4_s32").exists()
    pre = get_arch("pe-core-tiny").vision.preprocess
    ds = get_dataset("collection", world, "val", frames=4, size=32, cache_dir=tmp_path / "c", preprocess=pre)
    item = ds.video_dataset()[0]
    frames, _ = load_frames(ds.video_paths[0], 4, train=False)
    import torch

    want = resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), 32, pre)
    assert torch.equal(item["video"], want)  # read from the cache: squashed, not centre-cropped
    r = cli("data", "cache", "-d", "collection", "-r", world, "-s", "val", "--out", tmp_path / "c", "--backbone", "nope")
    assert r.exit_code != 0


def test_dataset_help_comes_from_the_format_table(cli):
    from vop.data import FORMATS

    for command in ("verify", "cache"):
        r = cli("data", command, "--help")
        text = " ".join(r.output.replace("│", " ").split())
        assert r.exit_code == 0 and all(name in text for name in FORMATS), text
        assert "default: test; val_1 for activitynet; all for collection" in text, text


def test_main_entry_point(world, tmp_path):
    if importlib.util.find_spec("vop.cli.params") is None:
        pytest.skip("vop.cli.main needs vop.cli.params (another module)")
    from vop.cli.main import main

    assert main(["data", "verify", "--dataset", "collection", "--root", str(world), "--split", "val",
                 "--manifest", str(tmp_path / "m.json")]) == 0
    assert main(["data", "verify", "--dataset", "collection", "--root", str(tmp_path / "nope")]) == 2  # DataError
    assert main(["data", "verify", "--dataset", "nope", "--root", str(world)]) == 2
