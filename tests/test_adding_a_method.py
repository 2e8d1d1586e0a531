"""Adding a method is one file (docs/methods.md, "Adding a method"): examples/clip_adapter.py is built,
trained by the real engine, saved and loaded, and reaches the `vop` command line as a plugin, without
any change to vop; a method shipped with vop is one file in src/vop/methods/ plus its import line, and the
registry-driven tests take it with no other edit. Run in subprocesses so that the registry of this test
session stays vop's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "clip_adapter.py"

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import clip_adapter  # registers "clip-adapter"
    import vop
    from vop.data import generate_world
    from vop.engine.config import RunConfig, load_config
    from vop.engine.trainer import train

    world, out = sys.argv[1], sys.argv[2]
    res = {"listed": "clip-adapter" in vop.list_methods(), "facts": vop.method_facts("clip-adapter").label}
    # ratio 0: exactly frozen CLIP
    clip = vop.build_clip("tiny", seed=0).eval()
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    zs, ad = vop.create_model("zeroshot", clip, frames=4), vop.create_model("clip-adapter", clip, frames=4, ratio=0.0)
    res["ratio0_is_clip"] = bool(torch.equal(zs.encode_video(video), ad.encode_video(video)))
    generate_world(world, size="smoke", progress=False)
    cfg = load_config(RunConfig, None, [f"data.root={world}", "data.dataset=collection", "model.backbone=tiny",
        "model.method=clip-adapter", "model.frames=4", "model.image_size=32", "optim.batch_size=8", "optim.epochs=1",
        "data.num_workers=0", "eval.batch_size=8", f"out_dir={out}", "optim.lr=5e-3"])
    summary = train(cfg, progress=False)
    ckpt = f"{out}/last.safetensors"
    model = vop.load_checkpoint(ckpt, vop.build_clip("tiny", seed=0)).eval()
    fresh = vop.create_model("clip-adapter", vop.build_clip("tiny", seed=0), frames=4)
    res["trained"] = any(not torch.equal(a, b) for a, b in zip(model.trainable_parameters(), fresh.trainable_parameters()))
    res["trainable"] = sorted(model.trainable_state_dict())
    again = vop.load_checkpoint(vop.save_checkpoint(model, f"{out}/again.safetensors"), vop.build_clip("tiny", seed=0)).eval()
    with torch.no_grad():
        res["reload_identical"] = bool(torch.equal(model.encode_video(video), again.encode_video(video)))
    res["steps"] = summary.get("steps")
    print(json.dumps(res))
""")


def _env(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return env


def test_example_method_builds_trains_saves_and_loads(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "clip_adapter.py")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "world"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["listed"] and res["facts"] == "CLIP-Adapter"
    assert res["ratio0_is_clip"] and res["trained"] and res["reload_identical"]
    assert res["trainable"] == ["frame_adapter.0.weight", "frame_adapter.2.weight", "text_adapter.0.weight", "text_adapter.2.weight"]


def test_example_method_reaches_the_command_line_as_a_plugin(tmp_path):
    """An installed package that declares the entry point vop.methods is found by the `vop` script."""
    shutil.copy(EXAMPLE, tmp_path / "clip_adapter.py")
    dist = tmp_path / "clip_adapter_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clip-adapter-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vop.methods]\nclip-adapter = clip_adapter\n")
    vop_script = shutil.which("vop", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])) or "vop"
    proc = subprocess.run([vop_script, "params", "--backbone", "ViT-B-32", "--json"], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert rows["clip-adapter"]["trainable"] == 2 * 2 * 512 * 128  # two bottlenecks 512 -> 128 -> 512, no biases
    assert "vop-fc" in rows

    # a plugin that fails to import: vop still works, and asking for its method says why
    (dist / "entry_points.txt").write_text("[vop.methods]\nbroken = no_such_module_here\n")
    proc = subprocess.run([vop_script, "params", "--backbone", "tiny", "--json"], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "no_such_module_here" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import vop; vop.create_model('broken', 'tiny')"], capture_output=True,
                          text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "failed to import" in proc.stderr and "no_such_module_here" in proc.stderr


# A method shipped with vop, written as a contributor would (docs/methods.md, "Adding a method"): it imports
# from vop.methods (the package it is part of), declares its options, option checks, the CLIP tensor it
# trains, its facts and what the shared tests expect, and its options for the shipped configs.
TOY = textwrap.dedent('''
    """Toy: a learned per-dimension scale on the text embedding, and CLIP's text projection trained."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from vop import limits
    from vop.methods import Expected, Rates, VideoTextModel, register


    @dataclass
    class ToyOptions:
        init: float = 1.0  # the scale's initial value: 1 is CLIP exactly


    @register("toy", label="Toy", rates=Rates(1e-3, 1e-4, "a test"), backbone="part",
              expected=Expected(b32=512 * 512 + 512, option_sets=(({"init": 2.0}, 512 * 512 + 512),)))
    class Toy(VideoTextModel):
        Options = ToyOptions

        @classmethod
        def check_options(cls, opts, cfg, frames):
            limits.check_float(opts.init, "model.options.init of toy", 0)

        @classmethod
        def config_options(cls, words, frames):
            return {"init": 1.0} if words > 32 else {}

        def trains_clip(self):
            return [self.clip.projection("text")]

        def build(self):
            self.scale = nn.Parameter(torch.full((self.clip.cfg.embed_dim,), float(self.opts.init)))

        def encode_text(self, tokens):
            return super().encode_text(tokens) * self.scale
''')

REGISTRY_DRIVEN = ["tests/test_methods.py", "tests/test_methods_descriptors.py", "tests/test_methods_ownership.py"]


def test_a_shipped_method_is_one_file_and_its_import_line(tmp_path):
    """A copy of the package with methods/toy.py and one import line added to methods/__init__.py: the
    registry-driven test files, unchanged, test the new method (its cases selected with -k toy) and pass."""
    pkg = tmp_path / "pkg" / "vop"
    shutil.copytree(ROOT / "src" / "vop", pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (pkg / "methods" / "toy.py").write_text(TOY)
    init = pkg / "methods" / "__init__.py"
    init.write_text(init.read_text() + "from vop.methods import toy  # noqa: E402,F401\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkg"))
    probe = subprocess.run([sys.executable, "-c", "import vop; print(vop.__file__); print(vop.list_methods()[-1]); "
                            "from vop.methods import get_method; print(get_method('toy').config_options(64, 64))"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == [str(pkg / "__init__.py"), "toy", "{'init':", "1.0}"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *REGISTRY_DRIVEN,
                           "-k", "toy or declares_its_facts or registry_complete"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = [line.split()[0] for line in proc.stdout.splitlines() if " PASSED" in line]
    # counts, option sets, start as CLIP, batch independence, frame order, gradients, meanP; declared backbone,
    # weight decay; ownership of what it trains (each option set too)
    toy = [t for t in passed if "[toy" in t]
    assert len(toy) == 12 and len(passed) == 14, proc.stdout[-3000:]
    assert all(any(t.startswith(f) for t in toy) for f in REGISTRY_DRIVEN), toy
