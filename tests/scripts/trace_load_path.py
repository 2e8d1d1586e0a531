"""Draw the path ``vop.load_checkpoint`` takes through vop's modules, and count it.

Three loads are traced on tiny files made here: (a) a prompt checkpoint (``vop``, backbone recorded as a
safetensors file), (b) one of the authors' ModelScope folders (VoP layout), (c) a whole-model (``full``)
checkpoint with no backbone. Each load runs once untraced (so lazy imports are done), then once under
``sys.setprofile``, keeping the "call" events of functions defined in ``vop.*`` modules (module bodies
excluded). The caller of a call is the nearest ``vop.*`` frame below it (so a torch function calling
back into vop counts as the vop function that called torch).

- calls: every call whose module differs from its caller's (the first call, from outside vop, is one);
- the path: those calls without the ones into the base layer (errors, limits, memory: leaves every
  layer calls, which call nothing back), a call repeated right after itself (same caller and callee
  modules: a loop) counted once. Its **stops** are its calls, its **rooms** the distinct modules,
  **returns** the stops at a room already visited (stops = rooms + returns), **rises** the stops in a
  higher layer than the stop before (the path going back up a layer, e.g. from a format to the loader);
- **upward**: the calls (all of them, not only the path's) from a module of a lower layer into one of a
  higher layer (none in a one-directional path), with the layers base (errors, limits, memory, _optional,
  _version) < formats < backbone, data < methods < engine, retrieval, runtime, metrics < cli, demo,
  the package top ``vop``.

    PYTHONPATH=src python tests/scripts/trace_load_path.py [--path] [--steps] [--as-formats M,...]
                                                   [--json out.json]

``--path`` prints the path (``^``: a rise, ``UP``: an upward call). ``--steps``: building a method
(``vop.methods.create_model``) and building a CLIP (``CLIP.__init__``) are one stop each, what they call
inside left out (the loader's own steps). ``--as-formats``: count these modules as the formats layer
(for code from before vop.formats, whose format code lived in backbone/ and methods/:
``--as-formats vop.backbone.checkpoint,vop.backbone.torchscript,vop.methods.checkpoint,vop.methods.modelscope``). tests/test_load_path.py runs :func:`trace_cases` and asserts no upward move.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

#: layer of a module, by its first two name parts (or the first one)
LAYERS: dict[str, int] = {
    "vop.errors": 0, "vop.limits": 0, "vop.memory": 0, "vop._optional": 0, "vop._version": 0,
    "vop.formats": 1,
    "vop.backbone": 2, "vop.data": 2, "vop.scoring": 2,
    "vop.methods": 3,
    "vop.engine": 4, "vop.retrieval": 4, "vop.runtime": 4, "vop.metrics": 4,
    "vop.cli": 5, "vop.demo": 5, "vop": 5,
}
LAYER_NAMES = ("base", "formats", "backbone/data/scoring", "methods", "engine/retrieval", "cli/top")


#: modules counted as the formats layer (``--as-formats``)
AS_FORMATS: set[str] = set()
#: functions whose inside is one stop (``--steps``): (module, qualified name)
OPAQUE: set[tuple[str, str]] = set()
STEPS = {("vop.methods", "create_model"), ("vop.backbone.clip", "CLIP.__init__")}


def layer(module: str) -> int:
    """The layer of a ``vop`` module (``vop.backbone.clip`` -> 2); a KeyError for a module no layer names."""
    if module in AS_FORMATS:
        return LAYERS["vop.formats"]
    parts = module.split(".")
    return LAYERS[".".join(parts[:2])] if ".".join(parts[:2]) in LAYERS else LAYERS[parts[0]]


def _is_vop(module: str | None) -> bool:
    return module is not None and (module == "vop" or module.startswith("vop."))


def trace(fn: Callable[[], Any]) -> list[tuple[str | None, str, str]]:
    """(caller module or None, callee module, callee function) of every stop while ``fn()`` runs."""
    stops: list[tuple[str | None, str, str]] = []
    inside: set[int] = set()  # frames of OPAQUE functions running
    resumable: dict[int, Any] = {}  # generator frames started (a resumed generator is not a new call)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and id(frame) in inside:
            inside.discard(id(frame))
        if event != "call":
            return
        module = frame.f_globals.get("__name__")
        if not _is_vop(module) or frame.f_code.co_name == "<module>" or inside:
            return
        if frame.f_code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
            if id(frame) in resumable:
                return
            resumable[id(frame)] = frame  # kept alive: its id is not reused while tracing
        if (module, frame.f_code.co_qualname) in OPAQUE:
            inside.add(id(frame))
        caller, f = None, frame.f_back
        while f is not None:
            m = f.f_globals.get("__name__")
            if _is_vop(m) and f.f_code.co_name != "<module>":
                caller = m
                break
            f = f.f_back
        if caller != module:
            stops.append((caller, module, frame.f_code.co_qualname))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return stops


def path_of(calls: list[tuple[str | None, str, str]]) -> list[tuple[str | None, str, str]]:
    """The path: calls into the base layer left out, a call repeated right after itself counted once."""
    out: list[tuple[str | None, str, str]] = []
    for caller, module, func in calls:
        if layer(module) == 0 or (out and out[-1][:2] == (caller, module)):
            continue
        out.append((caller, module, func))
    return out


def count(calls: list[tuple[str | None, str, str]]) -> dict[str, Any]:
    path = path_of(calls)
    seen: set[str] = set()
    returns, rises, last = 0, 0, None
    for caller, module, func in path:
        if module in seen:
            returns += 1
        seen.add(module)
        if last is not None and layer(module) > layer(last):
            rises += 1
        last = module
    up = [f"{c} -> {m}.{f}" for c, m, f in calls if c is not None and layer(m) > layer(c)]
    return {"calls": len(calls), "stops": len(path), "rooms": len(seen), "returns": returns, "rises": rises,
            "upward": len(up), "upward_moves": up, "modules": sorted(seen)}


def make_cases(root: Path) -> dict[str, Callable[[], Any]]:
    """The three loads, on files written under ``root``."""
    import vop

    backbone = root / "tiny.safetensors"
    vop.save_clip(vop.build_clip("tiny", seed=0), backbone)
    prompts = vop.save_checkpoint(vop.create_model("vop", backbone, frames=4, n_text=2, n_video=2), root / "vop.safetensors",
                                  backbone=backbone)
    full = vop.save_checkpoint(vop.create_model("full", backbone, frames=4), root / "full.safetensors", backbone=backbone)

    folder = root / "cv_vit-b32_retrieval_vop"  # as tests/test_methods_modelscope.py makes one
    folder.mkdir()
    sd = vop.build_clip("tiny", seed=0).state_dict()
    torch.save(sd, folder / "ViT-B-32.pt")
    hyper = {"vp_token_num": 3, "tp_prefix_token_num": 2, "tp_suffix_token_num": 2, "num_frames": 4, "input_res": 32,
             "pooling_type": "avg"}
    (folder / "configuration.json").write_text(json.dumps({"model": {"type": "vop-retrieval-model"}, "hyperparam": hyper}))
    g = torch.Generator().manual_seed(1)
    state = {"visual_prompt_learner.visual_prompts": torch.randn(2, 1, 3, 64, generator=g),
             "text_prompt_learner.text_prompts": torch.randn(2, 4, 64, generator=g)}
    for k, v in sd.items():
        state[f"clip.{k}"] = v
        if k.startswith("visual."):
            state[f"image_encoder.{k[len('visual.'):]}"] = v
        elif k != "logit_scale":
            state[f"text_encoder.{k}"] = v
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "VoP_msrvtt9k.pth")
    return {"prompt checkpoint": lambda: vop.load_checkpoint(prompts),
            "ModelScope folder": lambda: vop.load_checkpoint(folder),
            "whole model (full)": lambda: vop.load_checkpoint(full)}


def trace_cases(root: Path) -> dict[str, tuple[list[tuple[str | None, str, str]], dict[str, Any]]]:
    out = {}
    for name, fn in make_cases(root).items():
        fn()  # lazy imports, caches
        stops = trace(fn)
        out[name] = (stops, count(stops))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", action="store_true", help="print every stop")
    ap.add_argument("--steps", action="store_true", help="a method's and a CLIP's construction: one stop each")
    ap.add_argument("--as-formats", default="", help="modules (comma-separated) counted as the formats layer")
    ap.add_argument("--json", type=Path, help="write the counts here")
    a = ap.parse_args()
    AS_FORMATS.update(m for m in a.as_formats.split(",") if m)
    if a.steps:
        OPAQUE.update(STEPS)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        results = trace_cases(Path(d))
    print(f"{'load':22} {'calls':>6} {'upward':>6} | path: {'stops':>5} {'rooms':>5} {'returns':>7} {'rises':>5}")
    for name, (_, c) in results.items():
        print(f"{name:22} {c['calls']:6d} {c['upward']:6d} |       {c['stops']:5d} {c['rooms']:5d} {c['returns']:7d} "
              f"{c['rises']:5d}")
    for name, (calls, c) in results.items():
        if a.path:
            print(f"\n{name}:")
            last = None
            for caller, module, func in path_of(calls):
                mark = "UP" if caller is not None and layer(module) > layer(caller) else (
                    "^ " if last is not None and layer(module) > layer(last) else "  ")  # ^: a rise
                last = module
                print(f"  {mark} [{LAYER_NAMES[layer(module)]}] {caller or '(caller)'} -> {module}.{func}")
        elif c["upward_moves"]:
            print(f"\n{name}: upward moves")
            for m in c["upward_moves"]:
                print(f"  {m}")
    if a.json:
        a.json.write_text(json.dumps({n: c for n, (_, c) in results.items()}, indent=1))


if __name__ == "__main__":
    main()
