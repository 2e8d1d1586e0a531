"""Checkpoint formats in one place (vop.formats, one module per format), read in one direction.

The path ``vop.load_checkpoint`` and ``vop.load_clip`` take through vop's modules is traced
(tests/scripts/trace_load_path.py) and must never call from a lower layer into a higher one
(base < formats < backbone, data < methods < engine, retrieval < cli, demo, the package top); the
import graph is checked the same way, function-level imports included; every format module
registers one format; the formats read every CLIP format to the same tensors, bit for bit.
"""
import ast
import json
import sys
from pathlib import Path

import pytest
import torch

import vop
from vop import formats
from vop.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import trace_load_path as T  # noqa: E402


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "vop").rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()
TOP = ("vop", "vop.cli", "vop.demo")  # the top: may import anything, the package top included


def _is_top(module: str) -> bool:
    return module == "vop" or module.startswith(("vop.cli.", "vop.demo.")) or module in TOP


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported vop module, how it was written) of every import a file runs: module level and inside
    functions; ``if TYPE_CHECKING:`` blocks (never run) left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, f"import {a.name}") for a in node.names if a.name.split(".")[0] == "vop"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vop":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else node.module, f"from {node.module} import {a.name}"))
    return out


def test_the_layers_name_every_module():
    assert all(T.layer(m) in range(len(T.LAYER_NAMES)) for m in MODULES)
    assert [T.layer(m) for m in ("vop.limits", "vop.formats.torchscript", "vop.backbone.config", "vop.methods.checkpoint",
                                 "vop.retrieval.index", "vop.cli.main", "vop")] == [0, 1, 2, 3, 4, 5, 5]


def test_no_import_goes_up_a_layer():
    """formats imports nothing above it, backbone no method, methods no engine or retrieval ..."""
    bad = [f"{m}:{line}: {how}" for m, f in MODULES.items() for line, target, how in _imports(f)
           if T.layer(target) > T.layer(m)]
    assert not bad, bad


def test_formats_import_only_errors_limits_and_formats():
    bad = [f"{m}:{line}: {how}" for m, f in MODULES.items() if m.startswith("vop.formats") for line, target, how in _imports(f)
           if target not in ("vop.errors", "vop.limits") and not target.startswith("vop.formats")]
    assert not bad, bad


def test_no_library_module_imports_the_package_top():
    """``import vop`` or ``from vop import <not a module>`` (``__version__`` ...) only in the top: vop, cli, demo."""
    bad = [f"{m}:{line}: {how}" for m, f in MODULES.items() if not _is_top(m) for line, target, how in _imports(f)
           if target == "vop"]
    assert not bad, bad
    import vop._version

    assert vop.__version__ == vop._version.__version__
    assert any(target == "vop._version" for _, target, _ in _imports(MODULES["vop.methods.checkpoint"]))


def test_each_format_module_registers_one_format_and_is_imported():
    mods = sorted(m for m in MODULES if m.startswith("vop.formats.") and m != "vop.formats.registry")
    owner = {}
    for f in formats.list_formats():
        hooks = {getattr(f, h).__module__ for h in ("is_file", "read_file", "is_folder", "read_folder", "has_names",
                                                   "to_canonical", "arch_record", "beside", "is_checkpoint")
                 if getattr(f, h) is not None}
        assert len(hooks) == 1, (f.name, hooks)  # a format is one module
        owner[f.name] = hooks.pop()
    assert sorted(owner.values()) == mods  # one format per module, every module registered
    init = (SRC / "vop" / "formats" / "__init__.py").read_text()
    assert all(f"from vop.formats import {m.rsplit('.', 1)[1]}  # noqa" in init for m in mods)
    assert [f.name for f in formats.list_formats()] == ["torchscript", "state-dict", "safetensors", "hf-siglip", "hf-clip",
                                                         "open-clip-timm", "pe-clip", "openai-clip", "modelscope-vop",
                                                         "vop-prompts/1"]
    assert formats.expected() == (
        "an OpenAI TorchScript .pt, an open_clip/PyTorch state dict (.pt/.pth/.bin), a .safetensors file, a Hugging "
        "Face SiglipModel folder (config.json + model.safetensors), or a Hugging Face CLIPModel folder (config.json + "
        "model.safetensors or pytorch_model.bin)")


def test_load_checkpoint_goes_one_way(tmp_path):
    """(a) a prompt checkpoint, (b) a ModelScope folder, (c) a whole-model checkpoint: no call from a lower
    layer into a higher one; the files are read by the formats' modules; the folder's backbone is read
    and built once."""
    results = T.trace_cases(tmp_path)
    assert list(results) == ["prompt checkpoint", "ModelScope folder", "whole model (full)"]
    for name, (calls, c) in results.items():
        assert c["upward"] == 0, (name, c["upward_moves"])
        assert "vop.formats.registry" in c["modules"] and c["rooms"] == len(c["modules"]) >= 10, (name, c)
    rooms = {name: set(c["modules"]) for name, (_, c) in results.items()}
    assert {"vop.formats.vop_prompts", "vop.formats.safetensors_clip", "vop.backbone.checkpoint"} <= rooms["prompt checkpoint"]
    assert {"vop.formats.modelscope", "vop.formats.torch_state_dict", "vop.methods.modelscope"} <= rooms["ModelScope folder"]
    assert "vop.formats.vop_prompts" in rooms["whole model (full)"] and "vop.formats.safetensors_clip" not in rooms["whole model (full)"]
    folder = results["ModelScope folder"][0]
    assert sum(f == "read_clip" for _, m, f in folder) == 1 and sum(f == "clip_from_weights" for _, m, f in folder) == 1
    for name, (calls, _) in results.items():  # a format module calls nothing but its package and the base layer
        assert all(T.layer(m) <= 1 for c, m, _ in calls if c is not None and c.startswith("vop.formats")), name


def _tiny_sd():
    sd = {k: v.clone() for k, v in vop.build_clip("tiny", seed=0).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():  # non-trivial biases and LayerNorms: a dropped or misplaced tensor shows
        if v.dim() == 1:
            v += 0.1 * torch.randn(v.shape, generator=g)
    return sd


def _hf_names(sd):
    """OpenAI names -> Hugging Face CLIPModel names (the inverse of vop.formats.hf_clip.convert_hf)."""
    simple = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
              "visual.ln_post.weight": "vision_model.post_layernorm.weight",
              "visual.ln_post.bias": "vision_model.post_layernorm.bias",
              "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
              "logit_scale": "logit_scale"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    out = {}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t().contiguous()
        else:
            tower = "vision_model" if k.startswith("visual.") else "text_model"
            idx, rest = k.split("resblocks.", 1)[1].split(".", 1)
            base = f"{tower}.encoder.layers.{idx}."
            if rest.startswith("attn.in_proj_"):
                for which, part in zip("qkv", v.chunk(3)):
                    out[f"{base}self_attn.{which}_proj.{rest.rsplit('_', 1)[1]}"] = part.contiguous()
            else:
                a = next(a for a in block if rest.startswith(a + "."))
                out[base + block[a] + rest[len(a):]] = v
    return out


def test_every_clip_format_reads_the_same_tensors_one_way(tmp_path):
    """A TorchScript archive, a wrapped DataParallel state dict, our safetensors and a Hugging Face folder of the
    same weights: each read by its format (detected by content), to the same tensors bit for bit and the same
    architecture, and loading each goes one way."""
    import openai_clip
    from safetensors.torch import save_file

    sd = _tiny_sd()
    tiny = vop.get_arch("tiny")
    ts = openai_clip.save_archive(tmp_path / "archive.bin", openai_clip.build(sd))  # a TorchScript archive, any name
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pt")
    clip = vop.build_clip("tiny")
    clip.load_state_dict(sd)
    vop.save_clip(clip, tmp_path / "ours.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(_hf_names(sd), str(hf / "model.safetensors"))
    v, t = tiny.vision, tiny.text
    (hf / "config.json").write_text(json.dumps({
        "projection_dim": tiny.embed_dim,
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_width, "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size},
        "text_config": {"hidden_size": t.width, "intermediate_size": t.mlp_width, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length},
    }))
    want = {("archive.bin", "torchscript", "openai-clip", False), ("dp.pt", "state-dict", "openai-clip", False),
            ("ours.safetensors", "safetensors", "openai-clip", True), ("hf", "hf-clip", "hf-clip", True)}
    got = set()
    for path in (ts, tmp_path / "dp.pt", tmp_path / "ours.safetensors", hf):
        w = formats.read_clip(path)
        got.add((path.name, w.format, w.names, w.record is not None))
        calls = T.trace(lambda: vop.load_clip(path))
        assert T.count(calls)["upward"] == 0, T.count(calls)["upward_moves"]
        model = vop.load_clip(path)
        assert model.cfg == tiny, path
        state = model.state_dict()
        assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd), path
    assert got == want


def test_format_errors_name_the_file_and_the_formats(tmp_path):
    """The messages the formats give, unchanged by the move (vop.backbone.checkpoint re-exports FORMATS)."""
    from vop.backbone.checkpoint import FORMATS

    assert FORMATS == formats.expected()
    (tmp_path / "folder").mkdir()
    for path, words in ((tmp_path / "nosuch.pt", "no such file or folder"), (tmp_path / "folder", "a folder without config.json"),
                        (tmp_path / "empty.pt", "the file is empty"), (tmp_path / "junk.pt", "cannot be read as a CLIP checkpoint")):
        if path.name == "empty.pt":
            path.write_bytes(b"")
        elif path.name == "junk.pt":
            path.write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError) as e:
            vop.load_clip(path)
        assert str(e.value).startswith(f"{path}: {words}") and str(e.value).endswith(f"expected {FORMATS}"), str(e.value)
