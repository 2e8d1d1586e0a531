"""Training engine: exact accumulation, kill-and-resume, clear errors before any work, CLI/eval agreement."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vop
from vop.engine.config import RunConfig, load_config
from vop.engine.loss import accumulated_backward, contrastive_loss
from vop.errors import CheckpointError, ConfigError, DataError


def _cfg(world, out, *extra):
    return load_config(RunConfig, None, [
        f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4",
        "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8",
        f"out_dir={out}", "optim.lr=5e-3", *extra])


def test_accumulation_is_exact(tiny_clip, video_batch):
    """GradCache-style accumulation: 2 micro-batches give the gradient of the whole contrastive batch."""
    grads = []
    video = torch.cat([video_batch, video_batch.flip(1)])  # 6 videos
    for chunks in (1, 2, 3):
        torch.manual_seed(0)
        m = vop.create_model("vop-c", tiny_clip, frames=4)
        tokens = m.tokenizer(16)([f"caption {i}" for i in range(6)])
        n = 6 // chunks
        embed = lambda i: m(video[i * n:(i + 1) * n], tokens[i * n:(i + 1) * n])  # noqa: E731
        if chunks == 1:
            v, t = embed(0)
            loss = contrastive_loss(v, t, m.logit_scale)
            loss.backward()
            loss = loss.item()
        else:
            loss = accumulated_backward(embed, chunks, lambda: m.logit_scale)
        grads.append((loss, {k: p.grad.clone() for k, p in m.named_trainable_parameters()}))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        for k in g:
            assert torch.allclose(g[k], grads[0][1][k], atol=1e-6, rtol=1e-4), k


def test_kill_and_resume_matches_uninterrupted(world, tmp_path):
    """A run killed mid-epoch (no cleanup) and resumed ends bit-identical to an uninterrupted one."""
    from vop.engine.trainer import train

    full = train(_cfg(world, tmp_path / "full", "optim.epochs=2", "checkpoint_every=2"), progress=False)
    # the same run, killed after step 5 of 12 (last checkpoint at step 4), in its own process: the
    # trainer's test hook (an environment variable, not a setting) ends it as a crash would
    from vop.engine.trainer import TEST_STOP_ENV

    assert TEST_STOP_ENV == "VOP_TEST_STOP_AFTER_STEPS" and TEST_STOP_ENV not in os.environ
    cfg_args = [f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4", "model.image_size=32",
                "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8", f"out_dir={tmp_path / 'killed'}",
                "optim.lr=5e-3", "optim.epochs=2", "checkpoint_every=2"]
    proc = subprocess.run([sys.executable, "-m", "vop.cli.main", "train", "-q", *cfg_args], capture_output=True, text=True,
                          env={**os.environ, TEST_STOP_ENV: "5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    state = torch.load(tmp_path / "killed" / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 4, 4)  # mid-epoch
    assert not (tmp_path / "killed" / "results.json").exists()
    # a run folder of an older version saved the kill switch in its config: it loads, and does not stop again
    cfg_file = tmp_path / "killed" / "config.yaml"
    assert "stop_after_steps" not in cfg_file.read_text()
    cfg_file.write_text(cfg_file.read_text() + "stop_after_steps: 5\n")
    resumed = train(resume=tmp_path / "killed", progress=False)
    assert resumed["last"]["test"] == full["last"]["test"]
    assert resumed["selected"] == full["selected"]
    a = vop.read_checkpoint_meta(tmp_path / "full" / "last.safetensors")
    from safetensors.torch import load_file

    ta, tb = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "killed" / "last.safetensors"))
    assert a["method"] == "vop" and set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("split") == "val" for x in lines) and any("loss" in x for x in lines)


def test_run_directory_and_cli_eval_agree(world, tmp_path):
    from vop.cli.main import main

    rc = main(["train", "-q", f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4",
               "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "optim.epochs=1", f"out_dir={tmp_path / 'r'}"])
    assert rc == 0
    run = tmp_path / "r"
    for f in ("config.yaml", "versions.json", "metrics.jsonl", "state.pt", "last.safetensors", "best.safetensors", "results.json"):
        assert (run / f).exists(), f
    results = json.loads((run / "results.json").read_text())
    assert results["selected"]["epoch"] == 1 and "val" in results["validation"]
    rc = main(["eval", "--checkpoint", str(run / "last.safetensors"), "--dataset", "collection", "--root", str(world),
               "--image-size", "32", "--num-workers", "0", "-q", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["t2v"] == results["last"]["test"]["t2v"] and ev["v2t"] == results["last"]["test"]["v2t"]


def test_val_fraction_holds_out_training_videos(world, tmp_path):
    from vop.engine.trainer import build_datasets

    cfg = _cfg(world, tmp_path, "data.val_split=null", "data.val_fraction=0.25")
    d = build_datasets(cfg, 32)
    assert len(d.val.videos) == 4 and not set(d.val.videos) & set(d.train.videos)
    assert "held out" in d.val_note


def test_errors_before_any_work(world, tmp_path):
    from vop.engine.trainer import train

    with pytest.raises(ConfigError, match="has no option 'kss'"):
        train(_cfg(world, tmp_path / "a", "model.method=vop-f", "model.options.kss=3"), progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        train(_cfg(world, tmp_path / "a", "model.method=vopf"), progress=False)
    with pytest.raises(ConfigError, match="unknown key 'optim.epoch'"):
        _cfg(world, tmp_path, "optim.epoch=3")
    with pytest.raises(ConfigError, match="must be int"):
        _cfg(world, tmp_path, "optim.epochs=three")
    with pytest.raises(ConfigError, match="accumulate"):
        train(_cfg(world, tmp_path / "a", "optim.accumulate=3"), progress=False)
    (world / "empty.jsonl").write_text('{"video": "videos/none.mp4", "caption": "x", "split": "other"}\n')
    with pytest.raises((DataError, ConfigError), match="nosuch|no usable|empty|no samples"):
        train(_cfg(world, tmp_path / "b", "data.test_split=nosuch"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpoint_of_other_method_or_backbone(world, tmp_path):
    m = vop.create_model("vop-p", "tiny", frames=4)
    path = vop.save_checkpoint(m, tmp_path / "p.safetensors", extra={"backbone": "tiny"})
    with pytest.raises(CheckpointError, match="trained on a tiny backbone"):
        vop.load_checkpoint(path, "tiny-4l")
    from vop.methods.checkpoint import load_trainable

    with pytest.raises(CheckpointError, match="'vop-p' checkpoint"):
        load_trainable(vop.create_model("vop", "tiny", frames=4), path)


def test_paper_configs_load_and_are_current():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).parent.parent / "configs"
    spec = importlib.util.spec_from_file_location("make_configs", root / "make_configs.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    from vop.engine.trainer import check_config

    n = 0
    for name in mc.DATASETS:
        for method in vop.list_methods():
            path = root / name / f"{method}.yaml"
            assert path.read_text() == mc.render(name, method), f"{path} is stale: run configs/make_configs.py"
            cfg = load_config(RunConfig, path, ["data.root=/data"])
            check_config(cfg)
            assert cfg.optim.batch_size == 32 and cfg.model.frames in (12, 64)
            assert cfg.data.val_split or cfg.data.val_fraction > 0  # never select on test
            n += 1
    assert n == 5 * len(vop.list_methods())
    # the later methods' own recipes, next to the protocol (configs/<dataset>/as-published/)
    for name, method in mc.AS_PUBLISHED:
        path = root / name / "as-published" / f"{method}.yaml"
        assert path.read_text() == mc.as_published(name, method), f"{path} is stale: run configs/make_configs.py"
        cfg = load_config(RunConfig, path, ["data.root=/data"])
        check_config(cfg)
        vop.count_parameters(method, "ViT-B-16" if "B-16" in cfg.model.backbone else "ViT-B-32",
                             frames=cfg.model.frames, **cfg.model.options)  # the options build the model
        assert cfg.data.val_split or cfg.data.val_fraction > 0
    assert {p.relative_to(root).as_posix() for p in root.glob("*/as-published/*.yaml")} == \
        {f"{name}/as-published/{method}.yaml" for name, method in mc.AS_PUBLISHED}


def test_vop_learns_on_synthetic_world(world, tmp_path):
    """On the shipped tiny CLIP, training vop lowers the loss and gives test R@1 well above chance."""
    from vop.data import get_dataset
    from vop.engine.trainer import train

    res = train(load_config(RunConfig, None, [
        f"data.root={world}", "data.dataset=collection", "model.backbone=tiny-clip", "model.frames=4",
        "model.image_size=64", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=16",
        f"out_dir={tmp_path / 'r'}", "optim.lr=1e-2", "optim.epochs=4", "log_every=1", "data.train_split=train"]), progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05
    test = get_dataset("collection", world, "test", frames=4, size=64)
    r1 = res["last"]["test"]["t2v"]["R1"]
    chance = 100 / len(test.videos)  # 16 test videos (the smoke world is too small to beat zero-shot)
    assert r1 > 2 * chance
