"""Declared facts drive the code (issue 24): ``optim.lr`` / ``optim.backbone_lr`` left out are the method's
declared rates (its ``@register(rates=...)``, a plugin's alike), resolved once when a run starts, printed with
their source and saved in the run's config.yaml; a value given always wins. ``MethodFacts.trains_nothing`` is
derived from the method itself, and the demo asks it (and the other facts), never a method's name."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import vop
from vop.engine.config import ModelConfig, OptimConfig, RunConfig, load_config
from vop.engine.optim import resolve_rates
from vop.engine.trainer import TEST_STOP_ENV
from vop.errors import ConfigError
from vop.methods import registry

ROOT = Path(__file__).resolve().parents[1]


def vop_script() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("vop", path=path)
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return exe


def tiny_run(world, out, *extra) -> list[str]:
    return [f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", "model.frames=4",
            "model.image_size=32", "optim.batch_size=8", "data.num_workers=0", "eval.batch_size=8", "optim.epochs=1",
            "checkpoint_every=1", f"out_dir={out}", *extra]


def train_one_step(world, out, *extra, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`vop train` ended after its first optimiser step (the trainer's test hook), its state saved."""
    proc = subprocess.run([vop_script(), "train", "-q", *tiny_run(world, out, *extra)], capture_output=True, text=True,
                          timeout=300, env={**(env or os.environ), TEST_STOP_ENV: "1"}, cwd=cwd)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the hook's exit status: stopped after step 1
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def saved_rates(out: Path) -> tuple[float, float]:
    o = yaml.safe_load((out / "config.yaml").read_text())["optim"]
    return o["lr"], o["backbone_lr"]


def optimiser_rates(out: Path) -> dict[str, float]:
    """Group name -> the learning rate the optimiser started from (before warmup and decay)."""
    state = torch.load(out / "state.pt", weights_only=True)
    return {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}


# -- resolution ---------------------------------------------------------------------------------------

def test_left_out_rates_are_the_declared_ones_for_every_method():
    for m in vop.list_methods():
        cfg = RunConfig(model=ModelConfig(method=m))
        assert (cfg.optim.lr, cfg.optim.backbone_lr) == (None, None)  # the config's default: "the method's"
        resolved, line = resolve_rates(cfg)
        declared = vop.method_facts(m).rates
        assert (resolved.optim.lr, resolved.optim.backbone_lr) == (declared.lr, declared.backbone_lr), m
        assert f"(declared by {m}" in line, line
        assert (cfg.optim.lr, cfg.optim.backbone_lr) == (None, None)  # the caller's config is left as it was


def test_a_given_rate_wins_and_each_value_says_where_it_comes_from():
    cma = vop.method_facts("cma").rates
    assert (cma.lr, cma.backbone_lr) == (1e-5, 0.0)
    cfg, line = resolve_rates(load_config(RunConfig, None, ["model.method=cma", "optim.lr=2e-4"]))
    assert (cfg.optim.lr, cfg.optim.backbone_lr) == (2e-4, 0.0)
    assert line == f"learning rates: lr 0.0002 (given in the config); backbone_lr 0 (declared by cma: {cma.why})"
    cfg, line = resolve_rates(load_config(RunConfig, None, ["model.method=cma", "optim.lr=null"]))  # null: the method's
    assert (cfg.optim.lr, cfg.optim.backbone_lr) == (1e-5, 0.0)
    assert line == f"learning rates: lr 1e-05, backbone_lr 0 (declared by cma: {cma.why})"
    given = load_config(RunConfig, None, ["model.method=cma", "optim.lr=3e-3", "optim.backbone_lr=1e-6"])
    same, line = resolve_rates(given)
    assert same is given and line == "learning rates: lr 0.003, backbone_lr 1e-06 (given in the config)"


def test_a_run_folder_of_an_older_version_keeps_its_explicit_rates(tmp_path):
    """config.yaml of a run written before rates were resolved: explicit values, loaded and used as they are."""
    old = RunConfig(model=ModelConfig(method="cma"), optim=OptimConfig(lr=1e-3, backbone_lr=1e-6))
    from vop.engine.config import save_config

    save_config(old, tmp_path / "config.yaml")
    again = load_config(RunConfig, tmp_path / "config.yaml")
    assert again == old and resolve_rates(again)[0] == old


@pytest.fixture
def own_registry(monkeypatch):
    """A copy of the registry for methods registered by a test (taken out again after it)."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry


@pytest.mark.parametrize("rates, bad", [((0.0, 0.0), "lr=0.0"), ((float("nan"), 0.0), "lr=nan"),
                                        ((1e-3, -1.0), "backbone_lr=-1.0"), (("fast", 0.0), "lr='fast'")])
def test_a_declared_rate_that_is_no_learning_rate_is_a_config_error(own_registry, rates, bad):
    @own_registry.register("bad-rates", label="Bad", rates=registry.Rates(*rates))
    class Bad(vop.VideoTextModel):
        pass

    with pytest.raises(ConfigError, match=rf"method 'bad-rates' .*declares {bad}.*give optim\."):
        resolve_rates(RunConfig(model=ModelConfig(method="bad-rates")))
    explicit = RunConfig(model=ModelConfig(method="bad-rates"), optim=OptimConfig(lr=1e-3, backbone_lr=0.0))
    assert resolve_rates(explicit)[0] is explicit  # given values: the declaration is not read


# -- `vop train` --------------------------------------------------------------------------------------

def test_vop_train_cma_trains_at_its_declared_rate(world, tmp_path):
    """No lr given: cma's declared 1e-5 (not the old config default 1e-3), printed with its source, saved in
    the run's config.yaml and in the optimiser's groups; `--resume` goes on with it; a given lr wins."""
    out = tmp_path / "cma"
    proc = train_one_step(world, out, "model.method=cma")
    why = vop.method_facts("cma").rates.why
    assert f"learning rates: lr 1e-05, backbone_lr 0 (declared by cma: {why})" in proc.stderr
    assert saved_rates(out) == (1e-5, 0.0)
    assert optimiser_rates(out) == {"new-decay": 1e-5, "new-no_decay": 1e-5}  # cma trains nothing of CLIP
    resumed = subprocess.run([vop_script(), "train", "-q", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "learning rates: lr 1e-05, backbone_lr 0 (given in the config)" in resumed.stderr  # the saved values
    assert saved_rates(out) == (1e-5, 0.0)

    out = tmp_path / "cma-given"
    proc = train_one_step(world, out, "model.method=cma", "optim.lr=2e-4")
    assert f"learning rates: lr 0.0002 (given in the config); backbone_lr 0 (declared by cma: {why})" in proc.stderr
    assert saved_rates(out) == (2e-4, 0.0)
    assert optimiser_rates(out) == {"new-decay": 2e-4, "new-no_decay": 2e-4}


PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn
    from vop.methods import Rates, VideoTextModel, register

    @register("rated-part", label="Rated", backbone="part", rates=Rates(7e-4, 3e-5, "the test plugin's recipe"))
    class RatedPart(VideoTextModel):
        """A new module and CLIP's projections: both learning rates are used."""

        def build(self):
            for tower in ("visual", "text"):
                self.clip.projection(tower).requires_grad_(True)
            self.shift = nn.Parameter(torch.zeros(self.clip.cfg.embed_dim))

        def encode_text(self, tokens):
            return super().encode_text(tokens) + self.shift
''')


def test_a_plugins_declared_rates_drive_its_training(world, tmp_path):
    """Methods from installed plugins (entry points): this test's, which trains CLIP tensors too, and the example
    of docs/methods.md (examples/clip_adapter.py)."""
    (tmp_path / "rated_plugin.py").write_text(PLUGIN)
    shutil.copy(ROOT / "examples" / "clip_adapter.py", tmp_path / "clip_adapter.py")
    dist = tmp_path / "rated_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rated-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vop.methods]\nrated = rated_plugin\nclip-adapter = clip_adapter\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    proc = train_one_step(world, tmp_path / "rated", "model.method=rated-part", env=env, cwd=tmp_path)
    assert "learning rates: lr 0.0007, backbone_lr 3e-05 (declared by rated-part: the test plugin's recipe)" in proc.stderr
    assert saved_rates(tmp_path / "rated") == (7e-4, 3e-5)
    assert optimiser_rates(tmp_path / "rated") == {"new-no_decay": 7e-4, "backbone-decay": 3e-5}

    proc = train_one_step(world, tmp_path / "rated-given", "model.method=rated-part", "optim.backbone_lr=1e-7", env=env,
                          cwd=tmp_path)
    assert saved_rates(tmp_path / "rated-given") == (7e-4, 1e-7)
    assert optimiser_rates(tmp_path / "rated-given") == {"new-no_decay": 7e-4, "backbone-decay": 1e-7}

    proc = train_one_step(world, tmp_path / "adapter", "model.method=clip-adapter", env=env, cwd=tmp_path)
    assert "lr 0.001, backbone_lr 0 (declared by clip-adapter: CLIP-Adapter's few-shot recipe)" in proc.stderr
    assert saved_rates(tmp_path / "adapter") == (1e-3, 0.0)  # backbone_lr: the plugin's 0, not the old default 1e-6


# -- trains_nothing -------------------------------------------------------------------------------------

def test_trains_nothing_is_derived_from_the_method():
    assert [m for m in vop.list_methods() if vop.method_facts(m).trains_nothing] == ["zeroshot"]


def test_trains_nothing_of_a_plugin(own_registry):
    """Derived for any method: one without trainable tensors (a frozen buffer is no training) trains nothing;
    one that cannot be built on the tiny architecture counts as training (its run reports its own error)."""
    from torch import nn

    @own_registry.register("frozen-twin", label="Frozen twin", rates=registry.Rates(1e-3, 0.0))
    class FrozenTwin(vop.VideoTextModel):
        def build(self):
            self.register_buffer("temperature", torch.ones(()))

    @own_registry.register("one-tensor", label="One tensor", rates=registry.Rates(1e-3, 0.0))
    class OneTensor(vop.VideoTextModel):
        def build(self):
            self.gain = nn.Parameter(torch.ones(()))

    @own_registry.register("broken", label="Broken", rates=registry.Rates(1e-3, 0.0))
    class Broken(vop.VideoTextModel):
        def build(self):
            raise RuntimeError("needs a larger backbone")

    facts = {m: vop.method_facts(m).trains_nothing for m in ("frozen-twin", "one-tensor", "broken")}
    assert facts == {"frozen-twin": True, "one-tensor": False, "broken": False}
    assert vop.method_facts("frozen-twin") == dataclasses.replace(vop.method_facts("frozen-twin"), model_class=None)


# -- the demo asks the facts ----------------------------------------------------------------------------

def test_no_method_is_named_in_the_demo():
    """The demo asks facts, not names: no file of it names the method that trains nothing, and the report names
    none at all (the demo's default list of methods to run, run.HEADLINE, is the one list of names)."""
    for path in [ROOT / "src/vop/cli/demo.py", *(ROOT / "src/vop/demo").glob("*.py")]:
        names = vop.list_methods() if path.name == "report.py" else ["zeroshot"]
        text = path.read_text()
        for name in names:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (path, name)


def test_the_reference_row_is_the_method_that_trains_nothing(own_registry, monkeypatch):
    from vop.demo.ablations import ablations
    from vop.demo.run import reference_method

    assert reference_method() == "zeroshot"
    assert ablations(4)[0].rows[0].method == "zeroshot"
    monkeypatch.delitem(own_registry._METHODS, "zeroshot")

    @own_registry.register("frozen-clip", label="Frozen CLIP", rates=registry.Rates(1e-3, 0.0))
    class FrozenCLIP(vop.VideoTextModel):
        pass

    assert reference_method() == "frozen-clip"
    row = ablations(4)[0].rows[0]
    assert (row.label, row.method, row.key) == ("zero-shot CLIP (no prompts)", "frozen-clip", "frozen-clip")


def test_qualitative_page_methods_from_facts():
    from vop.demo.report import qualitative_methods

    defaults = ["zeroshot", "full", "vop", "vop-p", "vop-f", "vop-fc"]  # the demo's defaults, in its order
    assert qualitative_methods(defaults) == ["zeroshot", "vop", "vop-fc"]
    assert qualitative_methods(["zeroshot", "vop"]) == ["zeroshot", "vop"]
    assert qualitative_methods(["zeroshot", "vop-p", "cma", "full"]) == ["zeroshot", "vop-p", "cma"]
    assert qualitative_methods(["zeroshot", "full", "bias"]) == ["zeroshot", "full"]  # none keeps CLIP frozen


def test_demo_runs_are_typed_configs_equal_to_the_old_override_strings(tmp_path):
    """The run configs the demo builds directly are those it built from override strings before (so the demo's
    numbers cannot move), for the headline methods and the ablation rows (options included)."""
    from vop.demo.ablations import ablations
    from vop.demo.run import DemoSettings, run_config

    s = DemoSettings.smoke(frames=2, batch_size=16)
    world = tmp_path / "world"
    cases = [(m, {}) for m in ["full", "vop", "vop-p", "vop-f", "vop-fc", "bias", "cma", "dgl"]]
    cases += [(r.method, dict(r.options)) for a in ablations(4) for r in a.rows if not vop.method_facts(r.method).trains_nothing]
    assert ("vop", {"depth": 2, "prompt_from": "output"}) in cases and ("vop-f", {"ks": 0}) in cases
    for seed, (method, options) in enumerate(cases):
        rates = vop.method_facts(method).demo_rates
        run_dir = tmp_path / "runs" / f"{method}-{seed}"
        old = load_config(RunConfig, None, [
            f"data.root={world}", "data.dataset=collection", f"model.backbone={s.backbone}", f"model.method={method}",
            f"model.frames={s.frames}", f"model.image_size={s.image_size}", f"optim.epochs={s.epochs}",
            f"optim.batch_size={s.batch_size}", f"optim.lr={rates.lr}", f"optim.backbone_lr={rates.backbone_lr}",
            "optim.warmup_fraction=0.1", f"data.num_workers={s.num_workers}", "eval.batch_size=32",
            f"seed={seed}", f"out_dir={run_dir}", "log_every=20",
            *(f"model.options.{k}={v}" for k, v in options.items())])
        assert run_config(s, world, method, seed, run_dir, options) == old, (method, options)
