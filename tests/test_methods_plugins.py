"""Method plugins are isolated: one that fails at import in any way (an exception, ``sys.exit``, a name
that a shipped method has) or whose method fails to build is named as broken, and every other command
and method keeps working; asking for its method is one clear error. Through the real `vop` script,
with the plugins installed as a distribution on a temporary sys.path entry (as
tests/test_adding_a_method.py does), so that the registry of this test session stays vop's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGINS = {
    "exit_plugin": "import sys\nsys.exit(3)\n",
    "raise_plugin": "raise RuntimeError('boom at import')\n",
    "build_plugin": textwrap.dedent("""
        from vop.methods import Rates, VideoTextModel, register

        @register("bad-build", label="BadBuild", rates=Rates(1e-3, 0.0))
        class BadBuild(VideoTextModel):
            def build(self):
                raise RuntimeError("boom in build")
    """),
    # registers one name, then one of vop's: the whole plugin is left out (no half-registered plugin)
    "clash_plugin": textwrap.dedent("""
        from vop.methods import Rates, VideoTextModel, register

        @register("clash-first", label="first", rates=Rates(1e-3, 0.0))
        class First(VideoTextModel):
            pass

        @register("vop-p", label="VoP^P again", rates=Rates(1e-3, 0.0))
        class Clash(VideoTextModel):
            pass
    """),
    "good_plugin": textwrap.dedent("""
        import torch
        from torch import nn
        from vop.methods import Rates, VideoTextModel, register

        @register("good-one", label="Good", rates=Rates(1e-3, 0.0))
        class Good(VideoTextModel):
            def build(self):
                self.scale = nn.Parameter(torch.ones(3))
    """),
}
ENTRY_POINTS = {"exits": "exit_plugin", "raises": "raise_plugin", "bad-build": "build_plugin", "clash": "clash_plugin",
                "good-one": "good_plugin"}
VOP = shutil.which("vop", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])) or "vop"


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plugins")
    for name, src in PLUGINS.items():
        (d / f"{name}.py").write_text(src)
    dist = d / "broken_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vop.methods]\n" + "".join(f"{k} = {v}\n" for k, v in ENTRY_POINTS.items()))
    return d


def run(plugins: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), env.get("PYTHONPATH", "")])
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=plugins, timeout=timeout)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


def shipped() -> list[str]:
    import vop

    return [m for m in vop.list_methods() if vop.methods.plugin_of(m) is None]  # vop's own methods


def test_params_lists_every_working_method_and_names_the_broken_plugins(plugins):
    from vop.cli.params import params_table

    proc = run(plugins, VOP, "params", "--backbone", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    ok = {r["method"]: r for r in rows if not r["broken"]}
    assert list(ok) == shipped() + ["good-one"]  # clash-first was taken back out with its plugin
    own = {r["method"]: r for r in params_table("tiny", 12) if r["plugin"] is None}
    assert all(ok[m]["trainable"] == own[m]["trainable"] and ok[m]["plugin"] is None for m in own)
    assert ok["good-one"]["trainable"] == 3 and ok["good-one"]["plugin"] == "good-one = good_plugin"
    broken = {r["plugin"]: r for r in rows if r["broken"]}
    assert sorted(broken) == ["bad-build = build_plugin", "clash = clash_plugin", "exits = exit_plugin",
                              "raises = raise_plugin"]
    assert broken["exits = exit_plugin"]["broken"] == "failed to import: called sys.exit(3)"
    assert broken["raises = raise_plugin"]["broken"] == "failed to import: RuntimeError: boom at import"
    assert "'vop-p' is already registered by vop (vop.methods.vop.VoPP)" in broken["clash = clash_plugin"]["broken"]
    b = broken["bad-build = build_plugin"]
    assert b["method"] == "bad-build" and "failed to build: RuntimeError: boom in build" in b["broken"]
    assert b["trainable"] is None and all(broken[k]["method"] is None for k in broken if k != "bad-build = build_plugin")
    for ep in ("exits = exit_plugin", "raises = raise_plugin", "clash = clash_plugin"):  # and a warning on stderr
        assert f"the method plugin {ep}" in proc.stderr

    table = run(plugins, VOP, "params", "--backbone", "tiny")
    assert table.returncode == 0, table.stderr[-3000:]
    assert all(f"│ {m} " in table.stdout for m in shipped() + ["good-one"])
    assert "Left out, broken: method 'bad-build' of the plugin bad-build = build_plugin" in table.stdout
    assert "Left out, broken: the plugin exits = exit_plugin (failed to import: called sys.exit(3))" in table.stdout
    assert "Left out, broken: the plugin clash = clash_plugin" in table.stdout


def test_asking_for_a_broken_method_is_one_clear_error(plugins, tmp_path):
    proc = run(plugins, VOP, "train", "model.method=bad-build", "model.backbone=tiny", f"data.root={tmp_path}",
               f"out_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert ("error: method 'bad-build' (from the plugin bad-build = build_plugin) failed to build: RuntimeError: "
            "boom in build") in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run(plugins, VOP, "eval", "--method", "bad-build", "--backbone", "tiny", "--dataset", "collection",
               "--root", str(tmp_path))
    assert proc.returncode == 2 and "bad-build = build_plugin" in proc.stderr
    # a method of a plugin that failed to import: unknown, and the plugins that failed are named
    proc = run(plugins, VOP, "train", "model.method=clash-first", f"data.root={tmp_path}")
    assert proc.returncode == 2 and "unknown method 'clash-first'" in proc.stderr
    assert "clash = clash_plugin (ValueError: method 'vop-p' is already registered by vop" in proc.stderr
    # from Python: a ConfigError naming the plugin
    script = ("import vop\ntry:\n    vop.create_model('bad-build', 'tiny')\n"
              "except vop.ConfigError as e:\n    print('ConfigError:', e)\n")
    proc = run(plugins, sys.executable, "-c", script)
    assert proc.returncode == 0 and proc.stdout.startswith("ConfigError: method 'bad-build' (from the plugin "
                                                           "bad-build = build_plugin) failed to build")
    # the demo refuses before training anything
    proc = run(plugins, VOP, "demo", "--smoke", "--methods", "bad-build", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 2 and "bad-build = build_plugin" in proc.stderr and "[3/4]" not in proc.stdout


class _EntryPoint:
    def __init__(self, name: str, load):
        self.name, self.value, self.load = name, f"{name}_module", load


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as if no plugin had been scanned yet, restored afterwards."""
    from vop.methods import registry

    monkeypatch.setattr(registry, "_plugins", {})
    monkeypatch.setattr(registry, "_plugin_methods", {})
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry


def _entry_points(monkeypatch, eps):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps if group == "vop.methods" else [])


def test_ctrl_c_in_a_plugin_gets_through(fresh_registry, monkeypatch):
    def interrupt():
        raise KeyboardInterrupt

    _entry_points(monkeypatch, [_EntryPoint("slow", interrupt)])
    with pytest.raises(KeyboardInterrupt):
        fresh_registry.list_methods()


def test_a_plugin_is_loaded_whole_or_not_at_all(fresh_registry, monkeypatch):
    from vop.methods import Rates, VideoTextModel

    shipped_names = list(fresh_registry._METHODS)

    def half():
        @fresh_registry.register("half-first", label="h", rates=Rates(1e-3, 0.0))
        class First(VideoTextModel):
            pass

        raise SystemExit("bye")

    def good():
        @fresh_registry.register("whole", label="w", rates=Rates(1e-3, 0.0))
        class Whole(VideoTextModel):
            pass

    _entry_points(monkeypatch, [_EntryPoint("half", half), _EntryPoint("whole", good)])
    with pytest.warns(UserWarning, match="half = half_module .* called sys.exit\\('bye'\\)"):
        assert fresh_registry.list_methods() == shipped_names + ["whole"]
    assert fresh_registry.broken_plugins() == {"half = half_module": "called sys.exit('bye')"}
    assert fresh_registry.plugin_of("whole") == "whole = whole_module" and fresh_registry.plugin_of("vop") is None


def test_register_checks_what_it_decorates(fresh_registry):
    import dataclasses

    from vop.methods import Rates, VideoTextModel

    with pytest.raises(TypeError, match="not a subclass of vop.methods.VideoTextModel"):
        fresh_registry.register("not-a-model", label="x", rates=Rates(1e-3, 0.0))(dict)

    class NoDataclass(VideoTextModel):
        Options = dict

    with pytest.raises(TypeError, match="Options must be a dataclass"):
        fresh_registry.register("no-dataclass", label="x", rates=Rates(1e-3, 0.0))(NoDataclass)

    @dataclasses.dataclass
    class Opts:
        n: int = 1

    class Fine(VideoTextModel):
        Options = Opts

    assert fresh_registry.register("fine", label="x", rates=Rates(1e-3, 0.0))(Fine).name == "fine"
