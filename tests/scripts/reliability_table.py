"""Try every bad input of docs/reliability.md through the installed `vop` script (and a running
`vop serve`), and write the table from what actually came back: the user's line, the exit code or
HTTP status. Fails (exit 1) if any output holds a traceback, an exit code or HTTP status is not the
expected one, an HTTP answer is not strict JSON, or the marker file that the hostile weights files would
write appears.

    python tests/scripts/reliability_table.py            # writes docs/reliability.md (5-9 minutes on 2 busy cores)
    python tests/scripts/reliability_table.py --check    # the same runs, but only compares with the file
    python tests/scripts/reliability_table.py --only Indexes   # the sections named only; writes nothing

The hostile and damaged files are built with the tests' own builders (tests/openai_clip.py,
tests/test_methods_modelscope.py).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
TINY = "--image-size 32 --num-workers 0 -q"
TRAIN = ("data.root=world data.dataset=collection model.backbone=tiny model.frames=4 model.image_size=32 "
         "optim.batch_size=8 data.num_workers=0 eval.batch_size=8 optim.epochs=1")


def vop_exe() -> str:
    exe = shutil.which("vop", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not exe:
        sys.exit("the `vop` script is not installed: pip install -e .")
    return exe


def sh(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` as the user types it (``vop ...``), run by the shell in ``cwd``."""
    return subprocess.run(cmd.replace("vop ", vop_exe() + " ", 1), shell=True, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def seen(p: subprocess.CompletedProcess) -> str:
    """The line a user reads: the `error:` line, else the last line of a usage error, else the first
    line of the output (the one that states what was scored)."""
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    out = [ln for ln in p.stdout.splitlines() if ln.strip()]
    line = next((ln for ln in err if ln.startswith("error:")), None)
    if line is None:
        line = next((ln.strip("│ ").strip() for ln in err if "Error:" in ln or "Missing" in ln or "No such" in ln), None)
    if line is None:
        line = " / ".join(out[:2]) if out else (err[-1] if err else "")
    return line


def md(text: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > limit:
        text = text[:limit] + " ..."
    return text.replace("|", "\\|")


MARKER = "MARKER"  # what the hostile weights files write when something runs them (never, through vop)


class _System:
    """Unpickling it runs os.system (pickle's classic payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


PLUGINS = {  # as tests/test_methods_plugins.py: a distribution on a PYTHONPATH entry, its modules beside it
    "exit_plugin": "import sys\nsys.exit(3)\n",
    "build_plugin": ("from vop.methods import Rates, VideoTextModel, register\n\n\n"
                     "@register('bad-build', label='BadBuild', rates=Rates(1e-3, 0.0))\n"
                     "class BadBuild(VideoTextModel):\n"
                     "    def build(self):\n"
                     "        raise RuntimeError('boom in build')\n"),
}


def prepare(t: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import vop
    from vop.data import generate_world
    from vop.retrieval import build_index

    generate_world(t / "world", size="smoke")
    shutil.copytree(t / "world", t / "clean")
    for method in ("vop", "vop-f", "vop-fc", "cma"):
        torch.manual_seed(0)
        vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), t / f"{method}.safetensors", extra={"backbone": "tiny"})
    (t / "dup.yaml").write_text("optim:\n  batch_size: 8\n  lr: 1.0e-3\n  batch_size: 16\n")

    # weights files: OpenAI's TorchScript layout, benign and hostile (tests/openai_clip.py)
    sys.path.insert(0, str(ROOT / "tests"))
    import openai_clip
    from test_methods_modelscope import HYPER, _backbone_sd, make_folder

    sd = _backbone_sd()
    openai_clip.save_archive(t / "ViT-B-32.pt", openai_clip.build(sd))  # traced, as OpenAI's files
    # the payloads write MARKER in the working folder (relative: the files' bytes do not depend on the scratch path)
    hostile = openai_clip.save_archive(t / "hostile.pt", openai_clip.build(sd), payload=MARKER)
    torch.save({"weight": torch.zeros(2), "x": _System(f"touch {MARKER}")}, t / "evil.pt")
    with contextlib.chdir(t):  # the loaders that run code do run them: the rows below are not vacuous
        torch.jit.load(str(hostile))
        assert (t / MARKER).read_bytes() == b"PPPPPP", "the hostile archive does not write its marker"
        (t / MARKER).unlink()
        torch.load(t / "evil.pt", weights_only=False)
        assert (t / MARKER).exists(), "the pickle payload does not write its marker"
        (t / MARKER).unlink()
    shutil.copy(hostile, t / "hostile.safetensors")
    shutil.copy(hostile, make_folder(t / "ms-hostile") / "ViT-B-32.pt")
    make_folder(t / "ms-huge", hyper={**HYPER, "vp_token_num": 10**12})
    # a CLIP weights file, a prompt checkpoint trained on it, and another CLIP of the same size (the swap below;
    # not the archives above: what torch.jit.save writes holds this machine's paths, so their sizes vary)
    vop.save_clip(vop.build_clip("tiny", seed=0), t / "clip.safetensors")
    vop.save_clip(vop.build_clip("tiny", seed=1), t / "clip-other.safetensors")
    torch.manual_seed(0)
    vop.save_checkpoint(vop.create_model("vop-f", t / "clip.safetensors", frames=4), t / "vop-f-on-clip.safetensors",
                        backbone=t / "clip.safetensors")

    # architecture records of a safetensors CLIP (tests/test_bounds.py)
    tiny = {k: v.contiguous() for k, v in vop.build_clip("tiny", seed=0).state_dict().items()}
    for name, change in (("layers", ("vision", "layers", 100_000)), ("heads", ("vision", "heads", 3)), ("json", None)):
        rec = vop.get_arch("tiny").to_dict()
        if change:
            rec[change[0]][change[1]] = change[2]
        save_file(tiny, str(t / f"clip-{name}.safetensors"),
                  metadata={"vop_clip_config": json.dumps(rec) if change else "{not json"})

    # method plugins
    plugins = t / "plugins"
    plugins.mkdir()
    for name, src in PLUGINS.items():
        (plugins / f"{name}.py").write_text(src)
    dist = plugins / "broken_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vop.methods]\nexits = exit_plugin\nbad-build = build_plugin\n")

    # indexes: a dual-encoder (vop-f) and a pairwise (cma) one, and one whose model reads a backbone weights file
    (t / "ix-clean").mkdir()
    for name, ckpt in (("ix-dual", "vop-f.safetensors"), ("ix-pair", "cma.safetensors"),
                       ("ix-clip", "vop-f-on-clip.safetensors")):
        build_index(t / "world" / "videos" / "test", t / ckpt, t / "ix-clean" / name, image_size=32, progress=False)

    (t / "afile").write_text("x")


def flip(path: Path, offset: int, bit: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= bit
    path.write_bytes(bytes(b))


def npy_data_offset(path: Path) -> int:
    import numpy as np

    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def nan_row3(path: Path) -> None:
    import numpy as np

    a = np.load(path)
    a[3].flat[5] = np.nan
    np.save(path, a)


def restore(t: Path) -> None:
    """The clean world back; no run folder of an earlier row (`vop train` refuses an out_dir holding a run)."""
    shutil.rmtree(t / "world")
    shutil.copytree(t / "clean", t / "world")
    for run in ("r", "r2"):
        shutil.rmtree(t / run, ignore_errors=True)


def cli_cases():
    """(section, bad input, shell command, expected exit code, setup(t) run before, or None[, words the
    line shown must hold: so that a row cannot pass on another error than the one it is about])."""
    V = "world/videos/test"

    def missing13(t):
        for i in range(13):
            (t / V / f"test{i:05d}.mp4").unlink()

    def missing_and_broken(t):
        (t / V / "test00003.mp4").unlink()
        f = t / V / "test00000.mp4"
        f.write_bytes(f.read_bytes()[:2000])

    def truncated(t):
        f = t / V / "test00005.mp4"
        f.write_bytes(f.read_bytes()[:3000])

    def stale_manifest(t):
        (t / V / "test00003.mp4").rename(t / "kept.mp4")
        sh("vop data verify -d collection -r world -s test", t)
        (t / "kept.mp4").rename(t / V / "test00003.mp4")

    def train_broken(n):
        def setup(t):
            for f in sorted((t / "world/videos/train").glob("*.mp4"))[:n]:
                f.write_bytes(f.read_bytes()[:2000])
        return setup

    def link_cycle(t):
        (t / V / "sub").mkdir()
        os.symlink("..", t / V / "sub" / "loop")  # sub/loop -> the test folder itself

    def run_dir(damage):
        def setup(t):
            if not (t / "run" / "state.good").exists():
                shutil.rmtree(t / "run", ignore_errors=True)
                p = sh(f"vop train -q {TRAIN} checkpoint_every=2 out_dir=run", t)
                assert p.returncode == 0, p.stderr
                shutil.copy(t / "run" / "state.pt", t / "run" / "state.good")
            good = (t / "run" / "state.good").read_bytes()
            (t / "run" / "state.pt").write_bytes(damage(good))
        return setup

    def index(name, change=None):
        """A fresh copy of the clean index ``name``, then ``change`` applied to it."""
        def setup(t):
            shutil.rmtree(t / name, ignore_errors=True)
            shutil.copytree(t / "ix-clean" / name, t / name)
            if change:
                change(t / name)
        return setup

    def swap_backbone(t):
        index("ix-clip")(t)
        shutil.copy(t / "clip-other.safetensors", t / "clip.safetensors")

    def other_world(t):
        from vop.data import generate_world

        shutil.rmtree(t / "demo", ignore_errors=True)
        generate_world(t / "demo" / "world", seed=1, size="smoke")

    ev = f"vop eval --checkpoint vop.safetensors --dataset collection --root world {TINY}"
    zs = f"vop eval --method zeroshot --backbone {{}} --dataset collection --root world {TINY}"
    opt = f"vop train -q {TRAIN} out_dir=r"
    pp = "PYTHONPATH=plugins:$PYTHONPATH "
    q = "'a red circle'"
    json_ok = (f"{shlex.quote(sys.executable)} -c \"import json; r = json.load(open('o.json'), parse_constant=lambda c: 1 / 0)"
               "['results']; print('valid JSON:', len(r), 'results, ranks', r[0]['rank'], 'to', r[-1]['rank'])\" || exit 98")
    emb = "embeddings-1.npy"
    return [
        ("Exit codes", "a clean split, `--strict`", "vop data verify -d collection -r world -s test --strict", 0, None),
        ("Exit codes", "one video missing, one truncated, `--strict`",
         "vop data verify -d collection -r world -s test --strict", 1, missing_and_broken),
        ("Exit codes", "unknown dataset name", "vop data verify -d nosuch -r world", 2, None),
        ("Exit codes", "a required option left out", "vop eval --dataset collection", 2, None),
        ("Exit codes", "unknown command", "vop nosuchcmd", 2, None),
        ("Exit codes", "not a number", f"{ev} --batch-size abc", 2, None),
        ("Evaluation", "13 of the 16 test videos missing", ev, 2, missing13),
        ("Evaluation", "the same, with `--allow-partial`", f"{ev} --allow-partial", 0, missing13),
        ("Evaluation", "a test video that no longer decodes (found while encoding)", ev, 2, truncated),
        ("Evaluation", "a verify manifest listing a video that was restored since", ev, 0, stale_manifest),
        ("Evaluation", "`--frames 0`", f"{ev} --frames 0", 2, None),
        ("Evaluation", "`--batch-size 0`", f"{ev} --batch-size 0", 2, None),
        ("Evaluation", "`--num-workers -1`", "vop eval --checkpoint vop.safetensors --dataset collection --root world "
                                             "--image-size 32 --num-workers -1 -q", 2, None),
        ("Evaluation", "`--postprocess qbnorm` (needs training captions)", f"{ev} --postprocess qbnorm", 2, None),
        ("Evaluation", "`--device cuda` on a machine without CUDA", f"{ev} --device cuda", 2, None),
        ("Evaluation", "a checkpoint that does not exist", ev.replace("vop.safetensors", "nosuch.safetensors"), 2, None),
        ("Evaluation", "a file that is not a checkpoint", ev.replace("vop.safetensors", "world/captions.jsonl"), 2, None),
        ("Frames", "`vop eval --frames 8` on a 4-frame VoP^F checkpoint",
         ev.replace("vop.safetensors", "vop-f.safetensors") + " --frames 8", 2, None),
        ("Frames", "`vop eval --frames 8` on a 4-frame VoP^F+C checkpoint",
         ev.replace("vop.safetensors", "vop-fc.safetensors") + " --frames 8", 2, None),
        ("Frames", "`vop index --frames 8` on a 4-frame VoP^F checkpoint (no folder is written)",
         "vop index --videos world/videos/test --checkpoint vop-f.safetensors --out ix8 --frames 8 --image-size 32 -j 0 -q"
         " ; rc=$? ; test ! -e ix8 -a ! -e .ix8.vop-building || exit 99 ; exit $rc", 2, None),
        ("Frames", "`vop eval --frames 8` on basic VoP (any frame count works)", f"{ev} --frames 8", 0, None),
        ("Config", "`optim.batch_size=0`", f"vop train -q {TRAIN} out_dir=r optim.batch_size=0", 2, None),
        ("Config", "`data.num_workers=-1`", f"vop train -q {TRAIN} out_dir=r data.num_workers=-1", 2, None),
        ("Config", "`model.frames=0`", f"vop train -q {TRAIN} out_dir=r model.frames=0", 2, None),
        ("Config", "`optim.lr=-1`", f"vop train -q {TRAIN} out_dir=r optim.lr=-1", 2, None),
        ("Config", "`data.val_fraction=1`", f"vop train -q {TRAIN} out_dir=r data.val_fraction=1", 2, None),
        ("Config", "a key given twice in the YAML file", f"vop train -q -c dup.yaml {TRAIN} out_dir=r", 2, None),
        ("Config", "a misspelt key", f"vop train -q {TRAIN} out_dir=r optim.epoch=3", 2, None),
        ("Config", "a config file that does not exist", f"vop train -q -c nosuch.yaml {TRAIN} out_dir=r", 2, None),
        ("Config", "VoP^P `n_position` > `n_video`",
         f"vop train -q {TRAIN} out_dir=r model.method=vop-p model.options.n_position=9", 2, None),
        ("Config", "VoP^C `n_context=0`", f"vop train -q {TRAIN} out_dir=r model.method=vop-c model.options.n_context=0", 2, None),
        ("Config", "VoP^F `ks` beyond the image tower's layers",
         f"vop train -q {TRAIN} out_dir=r model.method=vop-f model.options.ks=5", 2, None),
        ("Data", "1 of 16 training videos unreadable (6% of the samples), `data.max_skipped=0.1`",
         f"vop train -q {TRAIN} out_dir=r data.max_skipped=0.1",
         0, train_broken(1)),
        ("Data", "2 of 16 training videos unreadable (12.5%), default `data.max_skipped=0.01`",
         f"vop train -q {TRAIN} out_dir=r2", 2, train_broken(2)),
        ("Data", "a link cycle in a folder to index (`sub/loop -> ..`)",
         "vop index --videos world/videos/test --checkpoint vop.safetensors --out ixc --image-size 32 -j 0 -q > o.txt"
         " ; rc=$? ; grep -v '^ixc:' o.txt ; exit $rc", 0, link_cycle),  # (the first line holds timings)
        ("Resume", "`state.pt` cut in half", "vop train --resume run -q", 2, run_dir(lambda b: b[: len(b) // 2])),
        ("Resume", "`state.pt` overwritten with text", "vop train --resume run -q", 2, run_dir(lambda b: b"garbage\n")),
        ("Resume", "`state.pt` empty", "vop train --resume run -q", 2, run_dir(lambda b: b"")),
        ("Resume", "a folder that is not a run", "vop train --resume world -q", 2, None),
        # issue 23: weights files are read as data, never run
        ("Weights files", "a TorchScript archive in OpenAI's layout (traced, `torch.jit.save`): read as data",
         zs.format("ViT-B-32.pt"), 0, None, "16 captions, 16 videos (the whole split)"),
        ("Weights files", "a TorchScript archive holding a scripted submodule whose `__setstate__` writes a file",
         zs.format("hostile.pt"), 2, None, "hostile.pt: a TorchScript archive vop cannot read as plain weights "
                                           "(class __torch__.openai_clip.Payload defines __setstate__"),
        ("Weights files", "the same archive named `.safetensors`", zs.format("hostile.safetensors"), 2, None,
         "hostile.safetensors: a TorchScript archive"),
        ("Weights files", "the same archive as `model.backbone` of a training run", f"{opt} model.backbone=hostile.pt",
         2, None, "hostile.pt: a TorchScript archive"),
        ("Weights files", "the same archive as the `ViT-B-32.pt` of a ModelScope folder",
         f"vop eval --checkpoint ms-hostile --dataset collection --root world {TINY}", 2, None,
         "ms-hostile/ViT-B-32.pt: a TorchScript archive"),
        ("Weights files", "a pickled state dict whose unpickling calls `os.system`", zs.format("evil.pt"), 2, None,
         "evil.pt: cannot be read as a CLIP checkpoint (the pickle is not plain weights: trying to load unsupported GLOBAL posix.system"),
        # issue 23: numbers checked before anything is allocated
        ("Bounds", "a ModelScope folder whose `configuration.json` says `vp_token_num` 10^12",
         f"vop eval --checkpoint ms-huge --dataset collection --root world {TINY}", 2, None,
         "vp_token_num must be an integer in 0..1024"),
        ("Bounds", "a safetensors CLIP whose architecture record says 100,000 layers",
         zs.format("clip-layers.safetensors"), 2, None, "vision.layers must be an integer in 1..256, got 100000"),
        ("Bounds", "... whose record says 3 heads on a 64-wide tower", zs.format("clip-heads.safetensors"), 2, None,
         "not divisible by vision.heads 3"),
        ("Bounds", "... whose record is not JSON", zs.format("clip-json.safetensors"), 2, None, "is not valid JSON"),
        ("Bounds", "MV-Adapter `heads=10^9`", f"{opt} model.method=mv-adapter model.options.heads=1000000000", 2, None,
         "heads of mv-adapter must be an integer in 1..64"),
        ("Bounds", "CMA `r=10^12`", f"{opt} model.method=cma model.options.r=1000000000000", 2, None,
         "r must be an integer in 1..16384"),
        ("Bounds", "MV-Adapter `cmt_layers=5` (not a list)", f"{opt} model.method=mv-adapter model.options.cmt_layers=5",
         2, None, "cmt_layers must be a list"),
        ("Bounds", "MV-Adapter `scale=.nan`", f"{opt} model.method=mv-adapter model.options.scale=.nan", 2, None,
         "scale must be a finite number, got nan"),
        ("Bounds", "VoP `n_text=100` (more prompts than CLIP's 77-token context holds)",
         f"{opt} model.method=vop model.options.n_text=100", 2, None, "n_text of vop must be an integer in 0..74, got 100"),
        ("Bounds", "`model.frames=1000000000`", f"{opt} model.frames=1000000000", 2, None,
         "'model.frames' must be in [1, 1024]"),
        ("Bounds", "`vop eval --frames 1000000000`", f"{ev} --frames 1000000000", 2, None, "--frames must be at most 1024"),
        ("Bounds", "a training step too large for the machine's memory",
         f"{opt} model.frames=1024 model.image_size=4096 optim.batch_size=1048576", 2, None, "lower optim.batch_size"),
        ("Bounds", "numbers each within bounds, together too large",
         "vop eval --method zeroshot --backbone tiny --dataset collection --root world --frames 1024 --image-size 4096 "
         "--batch-size 16 --num-workers 0 -q", 2, None, "a batch of 16 videos of 1024 frames at 4096 px"),
        # issue 23: a broken method plugin breaks nothing else
        ("Plugins", "a plugin that calls `sys.exit(3)` at import, one whose `build()` raises: `vop params` lists the "
                    "rest (these lines follow the table)",
         pp + "vop params --backbone tiny > o.txt ; rc=$? ; grep -A1 'Left out' o.txt ; exit $rc", 0, None,
         "the plugin exits = exit_plugin (failed to import: called sys.exit(3))"),
        ("Plugins", "asking for the method whose `build()` raises", f"{pp}{opt} model.method=bad-build", 2, None,
         "failed to build: RuntimeError: boom in build"),
        ("Plugins", "the same, `vop eval --method`",
         f"{pp}vop eval --method bad-build --backbone tiny --dataset collection --root world {TINY}", 2, None,
         "failed to build: RuntimeError: boom in build"),
        ("Plugins", "an unknown method, with a plugin that failed to import", f"{pp}{opt} model.method=nosuch", 2, None,
         "plugins that failed to import: exits = exit_plugin"),
        # issue 23: damaged indexes are named, never served
        ("Indexes", "the embeddings file emptied (0 bytes)", f"vop search ix-dual {q}", 2,
         index("ix-dual", lambda ix: (ix / emb).write_bytes(b"")), "empty (0 bytes)"),
        ("Indexes", "one bit flipped in the `.npy` header", f"vop search ix-dual {q}", 2,
         index("ix-dual", lambda ix: flip(ix / emb, 20, 0x40)), "damaged header"),
        ("Indexes", "one bit flipped in the data (the value stays finite: only the checksum sees it)",
         f"vop search ix-dual {q}", 2, index("ix-dual", lambda ix: flip(ix / emb, npy_data_offset(ix / emb) + 401, 1)),
         "SHA-256 differs"),
        ("Indexes", "one value set to NaN", f"vop search ix-dual {q}", 2,
         index("ix-dual", lambda ix: nan_row3(ix / emb)), "SHA-256 differs"),
        ("Indexes", "the same, checksums skipped (`--no-verify`)", f"vop search ix-dual {q} -k 16 --no-verify", 2,
         index("ix-dual", lambda ix: nan_row3(ix / emb)), "(row 3) scored nan"),
        ("Indexes", "one value set to NaN, pairwise (cma) index", f"vop search ix-pair {q}", 2,
         index("ix-pair", lambda ix: nan_row3(ix / emb)), "SHA-256 differs"),
        ("Indexes", "a key of `index.json` renamed (`dim` to `dIm`)", f"vop search ix-pair {q}", 2,
         index("ix-pair", lambda ix: (ix / "index.json").write_text(
             (ix / "index.json").read_text().replace('"dim"', '"dIm"', 1))), "field 'dim' is <missing>"),
        ("Indexes", "a dual-encoder index searched with a pairwise (cma) checkpoint",
         f"vop search ix-dual {q} --checkpoint cma.safetensors", 2, index("ix-dual"), "cannot be mixed"),
        ("Indexes", "a pairwise (cma) index searched with a dual-encoder (VoP^F) checkpoint",
         f"vop search ix-pair {q} --checkpoint vop-f.safetensors", 2, index("ix-pair"), "cannot be mixed"),
        ("Indexes", "`-k -1`, dual-encoder index", f"vop search ix-dual {q} -k -1", 2, index("ix-dual"),
         "-k must be an integer >= 1"),
        ("Indexes", "`-k 0`, dual-encoder index", f"vop search ix-dual {q} -k 0", 2, None, "-k must be an integer >= 1"),
        ("Indexes", "`-k -1`, pairwise index", f"vop search ix-pair {q} -k -1", 2, index("ix-pair"),
         "-k must be an integer >= 1"),
        ("Indexes", "`-k 0`, pairwise index", f"vop search ix-pair {q} -k 0", 2, None, "-k must be an integer >= 1"),
        ("Indexes", "`--json` (strict JSON: no NaN), dual-encoder index",
         f"vop search ix-dual {q} -k 3 --json > o.json ; rc=$? ; {json_ok} ; exit $rc", 0, None,
         "valid JSON: 3 results, ranks 1 to 3"),
        ("Indexes", "`--json`, `-k 1000` (more than the 16 videos), pairwise index",
         f"vop search ix-pair {q} -k 1000 --json > o.json ; rc=$? ; {json_ok} ; exit $rc", 0, None,
         "valid JSON: 16 results, ranks 1 to 16"),
        ("Indexes", "the backbone weights file replaced after indexing (another CLIP of the same size)",
         f"vop search ix-clip {q}", 2, swap_backbone, "clip.safetensors: changed since the index ix-clip was built"),
        # issue 23: the demo's output folder and world checked before any work
        ("Demo", "`--out` below a regular file", "vop demo --smoke --out afile/sub", 2, None,
         "it lies below afile, which is a file"),
        ("Demo", "`--out` holding the world of another seed (zero-shot only, to be quick)",
         "vop demo --smoke --methods zeroshot --out demo", 0, other_world, "demo/world held the world of size smoke, seed 1"),
        ("Server", "an index folder that does not exist", "vop serve nosuch", 2, None),
    ]


def http_cases():
    """(bad request, path, Host header or None, expected status)."""
    return [
        ("`/video/NAME/²` (a Unicode digit)", "/video/ix/%C2%B2", None, 404),
        ("`/thumb/NAME/²`", "/thumb/ix/%C2%B2", None, 404),
        ("`/thumb/NAME/٣` (Arabic-Indic three)", "/thumb/ix/%D9%A3", None, 404),
        ("a 5,000-digit row", "/thumb/ix/" + "1" * 5000, None, 404),
        ("Host header of another site (DNS rebinding)", "/api/search?q=a%20circle", "attacker.example:{port}", 400),
        ("Host `localhost` (allowed)", "/api/search?q=a%20circle&k=1", "localhost:{port}", 200),
        ("a 1 MB query", "/api/search?q=" + "a" * 1_000_000, None, 413),
        ("a 2,000-character query", "/api/search?q=" + "a" * 2000, None, 400),
        ("an empty query", "/api/search?q=", None, 400),
        ("a 5 MB query (beyond the 4 MiB request head uvicorn reads)", "/api/search?q=" + "a" * 5_000_000, None, None),
        ("`k=-1`", "/api/search?q=a%20circle&k=-1", None, 400),
        ("`k=0`", "/api/search?q=a%20circle&k=0", None, 400),
        ("`k=abc`", "/api/search?q=a%20circle&k=abc", None, 400),
        ("`k=1000` (the service answers at most 100)", "/api/search?q=a%20circle&k=1000", None, 400),
    ]


def strict_json(body: bytes):
    """JSON as the standard has it (no NaN / Infinity), else ValueError."""
    def no(name):
        raise ValueError(f"{name} in the answer")
    return json.loads(body, parse_constant=no)


def get(port: int, path: str, host: str | None):
    """(status, what the answer says, whether it is strict JSON)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path, headers={"Host": host.format(port=port)} if host else {})
        r = c.getresponse()
        body = r.read()
        try:
            data = strict_json(body)
            return r.status, data.get("error") or f"{len(data.get('results', []))} results", True
        except ValueError:
            return r.status, body[:80].decode("utf-8", "replace"), False
    except (ConnectionError, http.client.HTTPException):  # reset, broken pipe or no status line: as the timing falls
        return None, "connection closed without a response", False
    finally:
        c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli_cases(t: Path, only: list[str] | None, rows: dict[str, list[str]], problems: list[str]) -> None:
    scratch = sorted({str(t), str(t.resolve())}, key=len, reverse=True)
    for section, what, cmd, want, setup, *says in cli_cases():
        if only and section not in only:
            continue
        restore(t)
        if setup:
            setup(t)
        t1 = time.monotonic()
        p = sh(cmd, t)
        took = time.monotonic() - t1
        out = p.stdout + p.stderr
        if "Traceback" in out:
            problems.append(f"traceback: {cmd}\n{out[-2000:]}")
        if p.returncode != want:
            problems.append(f"exit {p.returncode}, expected {want}: {cmd}\n{out[-2000:]}")
        if (t / MARKER).exists():
            problems.append(f"{MARKER} was written (code in a weights file ran): {cmd}")
            (t / MARKER).unlink()
        shown = re.sub(r" 2?> \S+", "", cmd.split(" ; ")[0]).replace(TRAIN, "...").replace(TINY, "...")
        said = seen(p)
        for s in scratch:  # paths that messages give absolute (index.json records them so): relative to the scratch folder
            said = said.replace(s + os.sep, "").replace(s, ".")
        if says and says[0] not in said:
            problems.append(f"the line shown lacks {says[0]!r}: {cmd}\n{said}")
        rows.setdefault(section, []).append(f"| {md(what)} | `{md(shown, 200)}` | {md(said)} | {p.returncode} |")
        print(f"{p.returncode} {took:5.1f} s  {cmd[:100]}", flush=True)


def run_server_cases(t: Path, rows: dict[str, list[str]], problems: list[str]) -> list[str]:
    """A real `vop serve` on a free port; the rows of the HTTP table."""
    restore(t)
    p = sh("vop index --videos world/captions.jsonl --split test --checkpoint vop.safetensors --out ix --image-size 32 -j 0 -q", t)
    assert p.returncode == 0, p.stderr
    port = free_port()
    log_file = open(t / "serve.log", "w")  # a file, not a pipe: access-log lines of 1 MB would fill a pipe
    srv = subprocess.Popen([vop_exe(), "serve", "ix", "--port", str(port)], cwd=t, stdout=log_file,
                           stderr=subprocess.STDOUT, text=True)
    http_rows = []
    try:
        deadline = time.monotonic() + 120
        while get(port, "/api/indexes", None)[0] != 200:
            if time.monotonic() > deadline or srv.poll() is not None:
                raise SystemExit("vop serve did not start")
            time.sleep(0.5)
        # a second server on the same port
        p = sh(f"vop serve ix --port {port}", t)
        if "Traceback" in p.stdout + p.stderr or p.returncode != 2:
            problems.append(f"second server on a busy port: exit {p.returncode}\n{p.stderr[-2000:]}")
        rows.setdefault("Server", []).append(f"| the port is already in use | `vop serve ix --port PORT` | "
                                             f"{md(seen(p).replace(str(port), 'PORT'))} | {p.returncode} |")
        for what, path, host, want in http_cases():
            status, shown, is_json = get(port, path, host)
            if status != want:
                problems.append(f"HTTP {status}, expected {want}: {what}")
            if status is not None and not is_json:
                problems.append(f"HTTP {status} answer is not strict JSON: {what}: {shown}")
            req = path if len(path) < 60 else path[:40] + f"... ({len(path)} characters)"
            h = f" (Host: {host.split(':')[0]})" if host else ""
            http_rows.append(f"| {md(what)} | `GET {md(req)}`{h} | {md(shown)} | {status or 'none'} |")
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        log_file.close()
    log = (t / "serve.log").read_text(errors="replace")
    if "Traceback" in log:
        problems.append(f"traceback in the server log:\n{log[-3000:]}")
    return http_rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with docs/reliability.md instead of writing it")
    ap.add_argument("--only", nargs="+", metavar="SECTION",
                    help="run these sections only (Server: also the HTTP table), print their rows, write nothing")
    args = ap.parse_args()
    problems: list[str] = []
    rows: dict[str, list[str]] = {}
    http_rows: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vop-rel-") as tmp:
        t = Path(tmp)
        prepare(t)
        run_cli_cases(t, args.only, rows, problems)
        if not args.only or "Server" in args.only:
            http_rows = run_server_cases(t, rows, problems)
        if (t / MARKER).exists():
            problems.append(f"{MARKER} was written (code in a weights file ran)")

    text = render(rows, http_rows)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    if args.only:
        print(text[len(INTRO): -len(OUTRO)])
    elif args.check:
        # what differs between runs: timings, ports, the memory the machine has free
        norm = lambda s: re.sub(r"\d+(\.\d+)? s\b|\d+\.\d+ videos/s|'\d{4,5}'|:\d{4,5}\b|"  # noqa: E731
                                r"only \d+(\.\d+)? [KMGTPE]?i?B is available", "#", s)
        if norm(DOC.read_text()) != norm(text):
            import difflib

            diff = difflib.unified_diff(norm(DOC.read_text()).splitlines(), norm(text).splitlines(), "docs/reliability.md",
                                        "these runs", n=0, lineterm="")
            problems.append(f"{DOC} differs from what the runs give: regenerate it\n" + "\n".join(list(diff)[:40]))
            print(problems[-1], file=sys.stderr)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    print(f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 1 if problems else 0


def render(rows: dict[str, list[str]], http_rows: list[str]) -> str:
    head = "| bad input | command | what the user sees | exit code |\n|---|---|---|---|\n"
    parts = [INTRO]
    for section, lines in rows.items():
        parts.append(f"\n### {section}\n\n{head}" + "\n".join(lines) + "\n")
    parts.append("\n### HTTP requests to `vop serve`\n\n| bad request | request | answer | HTTP status |\n|---|---|---|---|\n"
                 + "\n".join(http_rows) + "\n")
    parts.append(OUTRO)
    return "".join(parts)


INTRO = """# Reliability: bad inputs and what you see

Every row below was run through the installed `vop` script (and a running `vop serve`) by
`python tests/scripts/reliability_table.py`, which wrote this file from what came back and fails if
any output holds a Python traceback, an exit code or HTTP status is not the expected one, an HTTP
answer is not strict JSON, or the file that the hostile weights files below write when they are run
appears. `...` in a command stands for the tiny settings of the run (synthetic smoke world, random
`tiny` backbone, 4 frames, 32 px). Paths are relative to its scratch folder. What vop treats as
untrusted input, and what it guarantees for each, is summed up [below](#what-vop-treats-as-untrusted-input).

Exit codes of `vop`: **0** success, **1** a check failed (`vop data verify --strict`), **2** a user
error (one `error:` line naming the file or key and what to do, or a usage message). Tests:
`tests/test_cli_reliability.py`, `tests/test_retrieval_reliability.py`, `tests/test_backbone_torchscript.py`,
`tests/test_bounds.py`, `tests/test_methods_plugins.py`, `tests/test_demo.py`.
"""

OUTRO = """
## What vop treats as untrusted input

Every file, folder, option and request a user hands vop is data to check, never code to run, with
the limits below. "Refused" means one `error:` line naming the file or option and what to do, exit
status 2, and nothing built, allocated or written for it.

- **Weights files and folders** (`--backbone`, `model.backbone`, a Hugging Face folder, a ModelScope
  folder's `ViT-B-32.pt`). *Guaranteed:* no code in them runs. A TorchScript archive (OpenAI's `.pt`
  files) is recognised by its content whatever its name and read as data by an allowlist reader
  (`vop/backbone/torchscript.py`: the zip's entries, the pickle's opcodes and globals, the parameter
  lists of the code listings read as literals); one whose classes define `__setstate__`, or that
  holds anything else, is refused, with the command that converts a file you trust. vop never calls
  `torch.jit.load` (a test reads its source for it); every `torch.load` passes `weights_only=True`;
  safetensors files are read by the safetensors library. Architecture records (`vop_clip_config`, a
  `config.json`) are checked for type and range, then compared with the tensors' shapes, before any
  model exists; a model larger than the free memory is refused. *Not guaranteed:* sensible values: a
  file with the right shapes and wrong, NaN or deliberately crafted weights loads (a non-finite query
  embedding is then an error in `vop search`, a non-finite video embedding a failed video in `vop
  index`).
- **Prompt checkpoints and ModelScope folders** (`--checkpoint`), and a run's `state.pt`
  (`--resume`). *Guaranteed:* a prompt checkpoint's metadata (method, options, frames, architecture)
  and a folder's `configuration.json` hyperparameters are checked for type, finiteness and range,
  then against the tensors present, before anything is built; the authors' `.pth` and `state.pt` are
  read with `torch.load(weights_only=True)`; a damaged `state.pt` names the intact previous one.
  *Not guaranteed:* sensible values, as for weights.
- **Index folders** (`vop search`, `vop serve`). *Guaranteed:* `index.json` is checked field by
  field; the `.npy` header is parsed (never a pickle) and its dtype, shape and size checked before
  any data is read; the embeddings, the video list and the FAISS file must match the SHA-256
  recorded when they were written; NaN/inf is never ranked; the checkpoint and backbone files must be
  the ones the index was built with; a model of the other kind (dual encoder, pairwise) and a bad
  `-k` are refused. `--no-verify` skips the hashing, which costs about 1.2 s per 2 GB of embeddings
  (measured: [search.md](search.md#integrity)); the header, shape, size and `index.json` checks still
  run and a NaN is still refused when it would be ranked, but a flipped bit that leaves a finite value
  goes unseen, and the backbone file is hashed only if its size or modification time changed.
  *Not guaranteed:* authenticity. The checksums sit in the folder they protect: they catch damage,
  not a deliberate replacement. A folder from someone else can hold any embeddings (wrong results)
  and a FAISS file (parsed by FAISS's own reader). `vop serve` sends a row's video only if the file has a
  video extension and the size and modification time (to the nanosecond) the row records, so a folder
  naming `/etc/passwd` or a key file gets a 404; a folder that names a video of yours together with its
  exact size and modification time would make it send that video. Open only indexes you built or trust.
- **Run configs and command-line options.** *Guaranteed:* YAML is read with a safe loader (no Python
  tags); unknown and duplicated keys are refused; every number is checked for type (a bool is not an
  integer), finiteness (no NaN, no infinity, no 401-digit integer) and range (`vop/limits.py`),
  method options likewise on a weightless model before any weights load; then the memory of the
  weights, of a training step (`vop/memory.py`) or of an evaluation batch is compared with what the
  device has free. *Not guaranteed:* that a run that passes fits: the step estimate is a lower bound
  (a measured step takes 1-2x it, `tests/test_bounds.py`), and other processes may take memory later.
- **Method plugins** (`vop.methods` entry points). *Guaranteed:* a plugin whose import raises (any
  exception but Ctrl-C, `sys.exit` included) or registers a method name already taken is left out
  whole, one whose method fails to build is named by `vop params` and refused when asked for, and
  every other method and command keeps working. *Not guaranteed:* isolation. Plugins run in vop's process with your rights:
  one that hangs, calls `os._exit()`, exhausts memory or replaces objects of vop or torch
  (monkeypatching) is not stopped ([methods.md](methods.md)). A plugin is code: install only plugins
  you trust.
- **Video files.** *Guaranteed:* a missing, empty, truncated or undecodable video is an error naming
  the file, never a blank frame: `vop eval` refuses (or, with `--allow-partial`, says what it left
  out), training counts skipped videos against `data.max_skipped`, `vop index` lists them as failed.
  *Not guaranteed:* what FFmpeg (through PyAV) does with a crafted file, and the memory of decoding
  a frame at the size the file declares: vop bounds the frames it samples and resizes, not the
  decoder.
- **The HTTP service** (`vop serve`). *Guaranteed:* it binds 127.0.0.1 unless told otherwise; only
  requests whose `Host` names this server are answered (DNS rebinding); query strings over 16 KiB get
  413, queries over 1,000 characters and `k` outside 1..100 get 400; video rows are ASCII digits and
  files are found by row in a loaded index, never by a path in the request; every answer is strict
  JSON. *Not guaranteed:* access control. There is no authentication, TLS or rate limit: whoever
  reaches the port can search and download every indexed video (`--host 0.0.0.0` logs a warning);
  request heads over 4 MiB are dropped by uvicorn without an answer.

## What the rules are

- **Partial galleries.** `vop eval` states how many captions and videos of the split it scored
  ("the whole split", or "PARTIAL: scored V of N videos and T of M captions; left out ... (why)"),
  in the console and in `--json` (`split_videos`, `split_texts`, `left_out_videos`,
  `left_out_texts`, `left_out_why`, `left_out`, `partial`). It refuses, before decoding anything,
  when a video of the split is missing or listed as bad by `vop data verify`, and after encoding
  when one turns out unreadable; `--allow-partial` scores what is there, and then every number
  says "(partial)" (and `"partial": true` sits in both metric blocks of the JSON). Training
  reports the same counts in `results.json` and marks a partial test set under its summary.
- **Verify manifests** record the size and mtime of each undecodable file; an entry whose file
  was restored or changed since is checked again, never trusted blindly.
- **Unreadable training videos** are counted per epoch over all ranks, logged, and written to
  `results.json` (`skipped`, and per epoch in `history`), with a warning at the end of the run;
  above `data.max_skipped` (default 1% of an epoch's samples, missing files included) the run
  stops with the error above. `vop data verify` decodes the frames training reads (first, last,
  the test-sampled ones, a train draw), and folder walks enter each real folder once, so a link
  cycle is listed, never followed forever.
- **Frames.** VoP^P's position-specific prompts and VoP^F's frame position embedding hold one
  learned tensor per frame position: a checkpoint trained with F frames runs with F frames only
  (no interpolation: it would be a different, untrained model). `--frames` of another count is
  refused before any video is decoded; other methods take any count. `model.frames` is read-only.
- **Indexes.** A new index is built in a hidden folder next to its target
  (`.NAME.vop-building`) and renamed when complete; a failed run removes it, unless it holds
  encoded parts, which the next run picks up. Updates of an existing index switch `index.json`
  atomically, as before.
- **Configs.** Every numeric setting has a range, checked for files, overrides and configs built
  in Python; a key given twice in one YAML mapping is refused; method options (`ks`,
  `n_position`, `n_context`) are checked on a weightless (meta-device) model before any weights
  load (`ks` against a weights file's depth only once it is read, unless `model.backbone_arch`
  names its architecture).
- **Bounds before allocation.** Every number a file, option or config gives is checked for type
  (an integer is not a bool, a float or a string; a list is a list), finiteness (no NaN, no
  infinity, no 401-digit integer) and range before anything is built (`vop/limits.py` lists the
  bounds and why: at most 1024 frames per video, 4096 px, 2^20 videos per batch, 1024 prompt
  tokens of a kind, towers of at most 256 layers and 16384 wide, text prompts that leave a
  3-token caption in CLIP's context). Architecture records (`vop_clip_config`, a Hugging Face
  `config.json`, the authors' `configuration.json`, a prompt checkpoint's metadata) are checked,
  then compared with the tensors the file holds, shape by shape, before any model exists. Then a
  model whose weights, or a training step whose estimated memory (`vop/memory.py`: a lower
  bound), exceed what the CPU or GPU has free is refused, naming the options or settings
  (`optim.batch_size`, `model.frames`, `model.image_size` ...) that made it large. Tests:
  `tests/test_bounds.py`.
- **Resume.** Training writes the new `state.pt` completely, then keeps the one before as
  `state.prev.pt` (a second name, then a rename: `state.pt` never disappears); a damaged
  `state.pt` is reported with the command that resumes from the previous one.
- **Server.** Video rows are ASCII digits only. Requests whose `Host` header is not an IP
  address, `localhost`, the `--host` name (or this machine's names when bound to 0.0.0.0) or a
  `--allowed-host` name get 400: a DNS-rebinding page cannot query a local server. Query strings
  over 16 KiB get 413; uvicorn reads request heads up to 4 MiB, beyond that it closes the
  connection without a status.
"""


if __name__ == "__main__":
    sys.exit(main())
