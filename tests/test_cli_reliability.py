"""No silent wrong results, no tracebacks (issue 13): exit codes of the `vop` script, partial galleries,
--frames on VoP^F, range-checked configs, a damaged resumable state. Through the real entry points:
the installed `vop` script (subprocess) and `vop.cli.main.main` (its return code is the exit status)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vop
from vop.cli.main import main

TINY = ["--image-size", "32", "--num-workers", "0", "-q"]


@pytest.fixture(scope="module")
def world_src(tmp_path_factory):
    from vop.data import generate_world

    d = tmp_path_factory.mktemp("rel") / "world"
    generate_world(d, size="smoke")
    return d


@pytest.fixture
def world(world_src, tmp_path):
    """A private copy (tests delete and damage videos)."""
    return Path(shutil.copytree(world_src, tmp_path / "world"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for method in ("vop", "vop-f", "vop-fc", "vop-p"):
        torch.manual_seed(0)
        out[method] = vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), d / f"{method}.safetensors",
                                          extra={"backbone": "tiny"})
    return out


def vop_script() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("vop", path=path)
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return exe


def run_vop(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([vop_script(), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


# -- 1. exit codes -----------------------------------------------------------------------------------

def test_console_script_exit_codes(world):
    """0 success, 1 a check failed (--strict), 2 a user error; never a traceback."""
    r = run_vop("data", "verify", "-d", "collection", "-r", world, "-s", "test", "--strict")
    assert r.returncode == 0, r.stderr
    (world / "videos/test/test00003.mp4").unlink()
    r = run_vop("data", "verify", "-d", "collection", "-r", world, "-s", "test", "--strict")
    assert r.returncode == 1 and "1 missing" in r.stdout, (r.returncode, r.stdout, r.stderr)
    r = run_vop("data", "verify", "-d", "collection", "-r", world, "-s", "test")  # no --strict: a report, not a failure
    assert r.returncode == 0
    r = run_vop("data", "verify", "-d", "nosuch", "-r", world)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = run_vop("eval", "--dataset", "collection")  # usage error (click): 2
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_main_returns_the_exit_status(world, tmp_path):
    (world / "videos/test/test00000.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    args = ["data", "verify", "-d", "collection", "-r", str(world), "-s", "test", "--manifest", str(tmp_path / "m.json")]
    assert main(args + ["--strict"]) == 1
    assert main(args) == 0


# -- 2. evaluation on a partial gallery ---------------------------------------------------------------

def _eval(ckpt, world, *extra):
    return main(["eval", "--checkpoint", str(ckpt), "--dataset", "collection", "--root", str(world), *TINY, *extra])


def test_eval_refuses_a_partial_gallery_unless_allowed(world, ckpts, tmp_path, capsys):
    for i in range(13):  # 13 of the 16 test videos gone
        (world / f"videos/test/test{i:05d}.mp4").unlink()
    capsys.readouterr()
    assert _eval(ckpts["vop"], world) == 2
    err = capsys.readouterr().err
    assert "13 of 16 videos (13 missing; 13 of 16 captions)" in err and "--allow-partial" in err and "Traceback" not in err

    assert _eval(ckpts["vop"], world, "--allow-partial", "--json", str(tmp_path / "e.json")) == 0
    out = capsys.readouterr().out.splitlines()
    assert "PARTIAL: scored 3 of 16 videos and 3 of 16 captions; left out 13 videos (13 missing) and 13 captions" in out[0]
    for line in out[1:3]:  # R@1 R@5 R@10 MdR MnR: each one marked
        assert line.count("(partial)") == 5, line
    e = json.loads((tmp_path / "e.json").read_text())
    assert (e["texts"], e["videos"], e["split_texts"], e["split_videos"]) == (3, 3, 16, 16)
    assert (e["left_out_videos"], e["left_out_texts"], e["left_out_why"], e["partial"]) == (13, 13, {"missing": 13}, True)
    assert e["t2v"]["partial"] is True and e["v2t"]["partial"] is True and len(e["left_out"]) == 13


def test_eval_refuses_unreadable_videos_and_reports_the_whole_split(world, ckpts, tmp_path, capsys):
    assert _eval(ckpts["vop"], world, "--json", str(tmp_path / "full.json")) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert "16 captions, 16 videos (the whole split)" in capsys.readouterr().out
    assert (full["partial"], full["left_out_videos"], full["split_videos"]) == (False, 0, 16) and "partial" not in full["t2v"]
    video = world / "videos/test/test00005.mp4"
    video.write_bytes(video.read_bytes()[:3000])  # present, but no frame decodes: found only while encoding
    assert _eval(ckpts["vop"], world) == 2
    assert "1 of 16 videos (1 unreadable" in capsys.readouterr().err
    assert _eval(ckpts["vop"], world, "--allow-partial") == 0
    assert "left out 1 videos (1 unreadable)" in capsys.readouterr().out


def test_stale_manifest_entries_are_checked_again(world, tmp_path):
    from vop.data import get_dataset
    from vop.data.verify import manifest_path, verify, write_manifest

    missing, broken = world / "videos/test/test00003.mp4", world / "videos/test/test00007.mp4"
    good_missing, good_broken = missing.read_bytes(), broken.read_bytes()
    missing.unlink()
    broken.write_bytes(good_broken[:2000])
    write_manifest(verify("collection", world, "test"), manifest_path(world, "collection", "test"))
    ds = get_dataset("collection", world, "test")
    assert sorted(ds.dropped_kinds.items()) == [("videos/test/test00003.mp4", "missing"),
                                                ("videos/test/test00007.mp4", "undecodable")]
    assert ds.coverage()["left_out_videos"] == 2 and ds.coverage()["split_videos"] == 16
    # both restored after the manifest was written: nothing is left out any more
    missing.write_bytes(good_missing)
    broken.write_bytes(good_broken)
    ds = get_dataset("collection", world, "test")
    assert len(ds.videos) == 16 and not ds.dropped and not ds.coverage()["partial"]
    # replaced by another broken file (other size): checked again, still left out, with the new reason
    broken.write_bytes(good_broken[:1500])
    assert "checked again" in get_dataset("collection", world, "test").dropped["videos/test/test00007.mp4"]


# -- 3. --frames on models whose tensors fix the frame count ------------------------------------------

@pytest.mark.parametrize("method, bound", [("vop-f", "frame position embedding"), ("vop-fc", "frame position embedding"),
                                           ("vop-p", "position-specific prompts")])
def test_eval_frames_refused_before_any_decoding(world, ckpts, method, bound, monkeypatch, capsys):
    import vop.data

    def no_data(*a, **k):
        raise AssertionError("the dataset was built before the frame count was checked")

    monkeypatch.setattr(vop.data, "get_dataset", no_data)
    assert _eval(ckpts[method], world, "--frames", "8") == 2
    err = capsys.readouterr().err
    assert f"trained with 4 frames per video and its {bound}" in err and "--frames 8 is not possible" in err


def test_frames_of_other_methods_leave_the_model_alone(world, ckpts, capsys):
    model = vop.load_checkpoint(ckpts["vop"], "tiny")
    assert model.check_frames(8) == 8 and model.frames == 4  # basic VoP: any frame count
    with pytest.raises(AttributeError):
        model.frames = 8  # never changed from outside
    assert _eval(ckpts["vop"], world, "--frames", "8", "--json", os.devnull) == 0
    assert _eval(ckpts["vop-f"], world, "--frames", "4") == 0  # its own count is fine
    assert _eval(ckpts["vop"], world, "--frames", "0") == 2
    assert "--frames must be >= 1, got 0" in capsys.readouterr().err


# -- 4. configs: ranges, duplicated keys, method options; before any weights load ----------------------

BASE = ["data.dataset=collection", "model.backbone=tiny", "model.frames=4", "model.image_size=32", "optim.epochs=1",
        "data.num_workers=0"]


@pytest.mark.parametrize("overrides, words", [
    (["optim.batch_size=0"], ["'optim.batch_size' must be >= 1, got 0"]),
    (["data.num_workers=-1"], ["'data.num_workers' must be >= 0, got -1"]),
    (["model.frames=0"], ["'model.frames' must be >= 1, got 0"]),
    (["optim.lr=0"], ["'optim.lr' must be > 0"]),
    (["data.val_fraction=1.0"], ["'data.val_fraction' must be in [0, 1), got 1.0"]),
    (["optim.grad_clip=0"], ["'optim.grad_clip' must be > 0 (or null: no clipping)"]),
    (["log_every=0"], ["'log_every' must be >= 1, got 0"]),
    (["model.method=vop-p", "model.options.n_position=9"], ["model.options.n_position=9", "0..8"]),
    (["model.method=vop-c", "model.options.n_context=0"], ["model.options.n_context=0", "1..8"]),
    (["model.method=vop-fc", "model.options.n_context=9"], ["model.options.n_context=9", "1..8"]),
    (["model.method=vop-f", "model.options.ks=5"], ["model.options.ks=5", "0..2"]),
])
def test_config_values_are_range_checked_before_any_weights_load(world_src, tmp_path, overrides, words, monkeypatch, capsys):
    import vop.engine.trainer as trainer

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(trainer, "resolve_backbone", no_weights)
    out = tmp_path / "run"
    assert main(["train", "-q", f"data.root={world_src}", f"out_dir={out}", *BASE, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_duplicated_yaml_key_is_refused(world_src, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  batch_size: 8\n  lr: 1.0e-3\n  batch_size: 16\n")
    assert main(["train", "-c", str(cfg), f"data.root={world_src}", f"out_dir={tmp_path / 'run'}", *BASE]) == 2
    assert f"{cfg}:4: duplicate key 'batch_size' (first given on line 2)" in capsys.readouterr().err


def test_config_built_in_python_is_checked_too(world_src, tmp_path):
    from vop.engine.config import RunConfig, load_config
    from vop.engine.trainer import train

    cfg = load_config(RunConfig, None, [f"data.root={world_src}", f"out_dir={tmp_path / 'run'}", *BASE])
    cfg.optim.batch_size = 0
    with pytest.raises(vop.ConfigError, match="'optim.batch_size' must be >= 1"):
        train(cfg, progress=False)


# -- 5. a damaged resumable state ------------------------------------------------------------------------

def test_save_state_keeps_the_previous_one(tmp_path):
    from vop.engine.trainer import load_state, previous_state_path, save_state

    path = tmp_path / "state.pt"
    common = {"trainable": {}, "batch": 0, "rng": {}}
    save_state(path, epoch=0, step=1, **common)
    assert not previous_state_path(path).exists()
    save_state(path, epoch=0, step=2, **common)
    assert load_state(path)["step"] == 2 and load_state(previous_state_path(path))["step"] == 1


def test_damaged_state_says_which_file_and_what_to_do(world_src, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", f"data.root={world_src}", f"out_dir={run}", *BASE, "optim.batch_size=8",
                 "checkpoint_every=2", "eval.every_epoch=false"]) == 0
    state, prev = run / "state.pt", run / "state.prev.pt"
    assert state.exists() and prev.exists()  # the state before the last one is kept
    good = state.read_bytes()
    for damage in (good[: len(good) // 2], b"garbage\n", b""):  # truncated, not a torch file, empty
        state.write_bytes(damage)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"{state}: the resumable training state is damaged or unreadable" in err, err
        assert f"mv {prev} {state}" in err and "Traceback" not in err and "weights_only` set to `False" not in err
    os.replace(prev, state)  # do what the message says
    assert main(["train", "--resume", str(run), "-q"]) == 0
    state.unlink()
    shutil.copy(run / "last.safetensors", prev)  # not a state at all, and state.pt missing
    assert main(["train", "--resume", str(run), "-q"]) == 2
    assert "state.pt: missing, but state.prev.pt is there" in capsys.readouterr().err
