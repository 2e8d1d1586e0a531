"""Adding a method is one file (docs/methods.md, "Adding a method"): examples/clip_adapter.py is built,
trained by the real engine, saved and loaded, and reaches the `vop` command line as a plugin, without
any change to vop. Run in subprocesses so that the registry of this test session stays vop's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clip_adapter.py"

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
