"""vop.runtime (issue 14, item 4): one device resolution, one autocast dtype, one batched text/video
encoder for the engine and the search service; the backbone a model was trained on as a checkpoint
field that ``vop.load_checkpoint(path)`` uses."""
import ast
import json
import os
from pathlib import Path

import pytest
import torch

import vop
from vop.errors import CheckpointError, ConfigError
from vop.runtime import autocast_dtype, encode_texts, encode_videos, resolve_device

SRC = Path(vop.__file__).parent


# ----------------------------------------------------------------------------------------------
# devices and dtypes
# ----------------------------------------------------------------------------------------------
def test_resolve_device_accepts_the_documented_choices_and_explains_the_rest():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "gpu0", "mps", ""):
        with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: CUDA is not available here; use --device cpu"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="device cuda:1: CUDA is not available"):
            resolve_device("cuda:1", local_rank=1, what="device")
    else:
        with pytest.raises(ConfigError, match="CUDA devices"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
        assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)


def test_torchrun_processes_resolve_their_device_the_same_way():
    from vop.engine.distributed import DistEnv

    env = DistEnv(rank=1, world_size=2, local_rank=1)
    assert env.device("cpu") == torch.device("cpu")
    assert env.device("auto") == (torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ConfigError, match="device 'tpu'"):
        env.device("tpu")


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "fp16") == torch.float16 and autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp32") is None


def test_old_import_paths_are_the_shared_functions():
    from vop.engine import evaluate

    assert evaluate.encode_texts is encode_texts and evaluate.encode_videos is encode_videos
    assert evaluate.autocast_dtype is autocast_dtype


# ----------------------------------------------------------------------------------------------
# one encoder
# ----------------------------------------------------------------------------------------------
def test_search_queries_are_the_evaluation_text_embeddings(tiny_clip):
    from vop.retrieval.search import encode_queries

    torch.manual_seed(0)
    model = vop.create_model("vop-fc", tiny_clip, frames=4).eval()
    texts = ["a red circle moves left", "the square turns blue", "x", "a dog jumps into a pool " * 8]
    ev = encode_texts(model, texts, batch_size=256, max_words=32)
    q = encode_queries(model, texts, max_words=32)
    assert q.dtype == torch.float32 and q.device.type == "cpu"
    assert torch.equal(q, ev)
    assert torch.equal(encode_queries(model, texts, tokenizer=model.tokenizer(max_words=32)), ev)
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    # batches change nothing but the batching
    assert torch.allclose(encode_texts(model, texts, batch_size=3), ev, atol=1e-6)
    assert encode_texts(model, []).shape == (0, tiny_clip.cfg.embed_dim)


# the modules that shared the encoders and the device resolution by importing each other's private names
SHARING = [*sorted((SRC / "retrieval").glob("*.py")), SRC / "runtime.py", SRC / "engine" / "evaluate.py",
           SRC / "engine" / "distributed.py", SRC / "cli" / "train.py", SRC / "cli" / "search.py",
           SRC / "methods" / "checkpoint.py"]


def test_no_module_imports_another_modules_private_names():
    bad = []
    for p in SHARING:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vop"):
                bad += [f"{p.relative_to(SRC)}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


# ----------------------------------------------------------------------------------------------
# the backbone a model was trained on, recorded in its checkpoint
# ----------------------------------------------------------------------------------------------
def _rewrite_meta(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["vop"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(path), metadata={"vop": json.dumps(meta)})


def test_backbone_is_a_checkpoint_field_and_old_files_keep_theirs(tmp_path, tiny_clip):
    torch.manual_seed(0)
    m = vop.create_model("vop-f", "tiny", frames=4)
    p = vop.save_checkpoint(m, tmp_path / "a.safetensors", backbone="tiny")
    meta = vop.read_checkpoint_meta(p)
    assert meta["backbone"] == "tiny" and meta["extra"] == {}
    # what earlier callers pass (and what vop train wrote) lands in the same field
    q = vop.save_checkpoint(m, tmp_path / "b.safetensors", extra={"backbone": "tiny", "epoch": 1})
    assert vop.read_checkpoint_meta(q)["backbone"] == "tiny"
    with pytest.raises(ValueError, match="differ"):
        vop.save_checkpoint(m, tmp_path / "c.safetensors", extra={"backbone": "tiny"}, backbone="ViT-B-32")
    # a file written before the field: read from extra.backbone
    _rewrite_meta(q, lambda meta: meta.pop("backbone"))
    assert vop.read_checkpoint_meta(q)["backbone"] == "tiny"
    # an existing weights file is recorded by its absolute path
    w = tmp_path / "w.safetensors"
    vop.save_clip(tiny_clip, w)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        r = vop.save_checkpoint(vop.create_model("vop-f", tiny_clip, frames=4), tmp_path / "r.safetensors", backbone="w.safetensors")
    finally:
        os.chdir(cwd)
    assert vop.read_checkpoint_meta(r)["backbone"] == str(w.resolve())


def test_load_checkpoint_uses_the_recorded_backbone(tmp_path):
    torch.manual_seed(0)
    m = vop.create_model("vop-f", "tiny", frames=4)
    new = vop.save_checkpoint(m, tmp_path / "a.safetensors", backbone="tiny")
    old = vop.save_checkpoint(m, tmp_path / "b.safetensors", extra={"backbone": "tiny"})
    _rewrite_meta(old, lambda meta: meta.pop("backbone"))  # as written before the field
    for p in (new, old):
        a, b = vop.load_checkpoint(p).eval(), vop.load_checkpoint(p, "tiny").eval()
        tokens = a.tokenizer()(["a dog"])
        with torch.no_grad():
            assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))
    none = vop.save_checkpoint(m, tmp_path / "n.safetensors")
    with pytest.raises(CheckpointError, match="holds only prompts and records no backbone"):
        vop.load_checkpoint(none)
    gone = vop.save_checkpoint(m, tmp_path / "g.safetensors", backbone=str(tmp_path / "moved.safetensors"))
    with pytest.raises(CheckpointError, match="recorded in the checkpoint"):
        vop.load_checkpoint(gone)


def test_check_backbone_is_public(tmp_path):
    from vop.methods.checkpoint import check_backbone

    m = vop.create_model("vop-f", "tiny", frames=4)
    p = vop.save_checkpoint(m, tmp_path / "a.safetensors", backbone="tiny")
    meta = vop.read_checkpoint_meta(p)
    check_backbone(p, meta, m.clip)  # the backbone it was trained on
    with pytest.raises(CheckpointError, match="fingerprint"):
        check_backbone(p, meta, vop.build_clip("tiny", seed=1))


def test_a_vop_train_checkpoint_loads_with_its_path_alone(tmp_path, tiny_clip, monkeypatch):
    """Trained by `vop train` on a weights file given by a relative path; loaded from another folder
    with nothing but its path: the same model as with the backbone given explicitly."""
    from vop.cli.main import main
    from vop.data import generate_world

    world = tmp_path / "world"
    generate_world(world, size="smoke")
    (tmp_path / "a").mkdir()
    vop.save_clip(tiny_clip, tmp_path / "a" / "w.safetensors")
    monkeypatch.chdir(tmp_path / "a")
    rc = main(["train", "-q", f"data.root={world}", "data.dataset=collection", "model.backbone=w.safetensors",
               "model.method=vop-f", "model.frames=4", "model.image_size=32", "optim.batch_size=8", "data.num_workers=0",
               "optim.epochs=1", "eval.batch_size=16", f"out_dir={tmp_path / 'run'}"])
    assert rc == 0
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "run" / "last.safetensors"
    assert vop.read_checkpoint_meta(ckpt)["backbone"] == str((tmp_path / "a" / "w.safetensors").resolve())
    alone = vop.load_checkpoint(ckpt).eval()
    given = vop.load_checkpoint(ckpt, tmp_path / "a" / "w.safetensors").eval()
    texts = ["a red circle moves left", "a blue square"]
    assert torch.equal(encode_texts(alone, texts), encode_texts(given, texts))
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 4, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(alone.encode_video(video), given.encode_video(video))
