"""TorchScript archives (OpenAI's released .pt files) are read as data, never run (issue 23).

Archives are written here in OpenAI's module layout (tests/openai_clip.py), traced and scripted, fp32
and fp16: the restricted reader must give ``torch.jit.load(path).state_dict()`` bit for bit (jit.load
runs only here, on our own benign archives, as the reference). A hostile archive (a valid tiny CLIP
plus a submodule whose TorchScript ``__setstate__`` writes a file; the test checks that it does under
``torch.jit.load``) must be refused through every entry point without the file appearing.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import vop
from vop.backbone.checkpoint import read_state_dict
from vop.backbone.torchscript import convert_hint, is_torchscript, read_torchscript
from vop.errors import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
import openai_clip  # noqa: E402
from test_methods_modelscope import _backbone_sd, make_folder  # noqa: E402


@pytest.fixture(scope="module")
def sd():
    """vop's tiny CLIP with non-trivial LayerNorms, OpenAI names."""
    return _backbone_sd()


@pytest.fixture(scope="module")
def benign(sd, tmp_path_factory):
    return openai_clip.save_archive(tmp_path_factory.mktemp("ts") / "ViT-B-32.pt", openai_clip.build(sd))


@pytest.fixture(scope="module")
def hostile(sd, tmp_path_factory):
    """(archive, marker): the archive writes ``marker`` when torch.jit.load reads it (checked here)."""
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "MARKER"
    path = openai_clip.save_archive(d / "ViT-B-32.pt", openai_clip.build(sd), payload=str(marker))
    assert not marker.exists()
    torch.jit.load(str(path))  # the reference loader runs the payload: the test cannot pass vacuously
    assert marker.read_bytes() == b"PPPPPP"
    marker.unlink()
    return path, marker


@pytest.fixture
def no_jit(monkeypatch):
    """Fail if anything reaches TorchScript's loader."""
    def refuse(*a, **k):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module_from_buffer", refuse)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same(a: dict, b: dict) -> None:
    """Same names in the same order, dtypes, shapes, strides and bytes."""
    assert list(a) == list(b)
    for k in a:
        assert (a[k].dtype, a[k].shape, a[k].stride()) == (b[k].dtype, b[k].shape, b[k].stride()), k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


# -- 1. the reader gives jit.load's state dict, bit for bit ------------------------------------------

@pytest.mark.parametrize("mode", ["trace", "script"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reader_equals_jit_load_state_dict(sd, tmp_path, mode, dtype, monkeypatch):
    path = openai_clip.save_archive(tmp_path / "clip.pt", openai_clip.build(sd), mode=mode, dtype=dtype)
    ref = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    assert len(ref) == len(sd) + 3 and {"input_resolution", "context_length", "vocab_size"} <= set(ref)  # OpenAI's scalars

    def refuse(*a, **k):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)
    got = read_torchscript(path)
    _same(got, ref)
    assert {str(v.dtype) for k, v in got.items() if k not in ("input_resolution", "context_length", "vocab_size")} == {str(dtype)}
    assert int(got["context_length"]) == 77 and int(got["vocab_size"]) == 49408 and int(got["input_resolution"]) == 32
    assert all(torch.equal(got[k].float(), v.to(dtype).float()) for k, v in sd.items())

    # load_clip through the archive = load_clip of the reference state dict saved plainly
    torch.save(ref, tmp_path / "plain.pt")
    a, b = vop.load_clip(path), vop.load_clip(tmp_path / "plain.pt")
    assert a.cfg == b.cfg
    _same(a.state_dict(), b.state_dict())


def test_scripted_module_details_match_jit_load(tmp_path):
    """Non-persistent buffers (TorchScript keeps them), a None bias, an int-list attribute, a plain
    tensor attribute (not in the state dict), a buffer declared before a parameter, a nested module at
    the archive's top-level code file (``code/__torch__.py``)."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b0", torch.arange(3, dtype=torch.int32))
            self.w = torch.nn.Parameter(torch.randn(3, 2).t())  # non-contiguous
            self.register_buffer("np", torch.ones(4, dtype=torch.bfloat16), persistent=False)
            self.lin = torch.nn.Linear(2, 2, bias=False)
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.mask = torch.zeros(2)
            self.flags = torch.tensor([True, False])

        def forward(self, x):
            return self.lin(x) + self.mask + self.w[0] + self.b0[:2] + self.np[:2].float()

    m = torch.jit.script(M())
    torch.jit.save(m, str(tmp_path / "m.pt"))
    ref = torch.jit.load(str(tmp_path / "m.pt")).state_dict()
    got = read_torchscript(tmp_path / "m.pt")
    _same(got, ref)
    assert list(got)[:3] == ["w", "b0", "np"] and got["w"].stride() == ref["w"].stride() == (1, 2)


def test_storages_saved_on_cuda_are_read_to_the_cpu(benign, tmp_path):
    """OpenAI traced their models on the GPU: storages whose location is cuda:0 (jit.load needs
    map_location="cpu" on a CPU machine; the reader ignores the location)."""
    data = zipfile.ZipFile(benign).read("ViT-B-32/data.pkl")
    cpu = b"X\x03\x00\x00\x00cpu"
    assert cpu in data
    cuda = _rezip(benign, tmp_path / "cuda.pt", lambda n, d: d.replace(cpu, b"X\x06\x00\x00\x00cuda:0") if n == "data.pkl" else d)
    _same(read_torchscript(cuda), torch.jit.load(str(cuda), map_location="cpu").state_dict())
    _same(read_torchscript(cuda), read_torchscript(benign))


def test_torchscript_is_recognised_by_content_whatever_the_name(benign, tmp_path, no_jit):
    want, _ = read_state_dict(benign)
    for name in ("weights.safetensors", "pytorch_model.bin", "clip.pth", "noext"):
        shutil.copy(benign, tmp_path / name)
        assert is_torchscript(tmp_path / name)
        _same(read_state_dict(tmp_path / name)[0], want)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(benign, hf / "pytorch_model.bin")
    _same(read_state_dict(hf)[0], want)
    assert not is_torchscript(tmp_path / "nosuch") and not any(is_torchscript(p) for p in (hf / "config.json",))


def test_load_clip_never_reaches_jit(benign, sd, no_jit):
    model = vop.load_clip(benign)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


# -- 2. the hostile archive, every entry point ---------------------------------------------------------

def test_torch_load_weights_only_refuses_torchscript_without_running_it(hostile):
    """What the non-TorchScript path relies on: torch 2.13's torch.load(weights_only=True) raises on a
    TorchScript archive instead of dispatching to torch.jit.load."""
    path, marker = hostile
    with pytest.raises(RuntimeError, match="weights_only=True.*TorchScript"):
        torch.load(str(path), map_location="cpu", weights_only=True)
    assert not marker.exists()


def test_hostile_archive_is_refused_in_process(hostile, sd, tmp_path, no_jit):
    path, marker = hostile
    msg = r"a TorchScript archive vop cannot read as plain weights \(class __torch__\.openai_clip\.Payload defines __setstate__"
    with pytest.raises(CheckpointError, match=rf"{path}: {msg}") as e:
        vop.load_clip(path)
    assert "python -c" in str(e.value) and "torch.jit.load(" in str(e.value)  # the trusted conversion
    shutil.copy(path, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=rf"x\.safetensors: {msg}"):
        vop.load_clip(tmp_path / "x.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(path, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin: {msg}"):
        vop.load_clip(hf)
    folder = make_folder(tmp_path / "ms")
    shutil.copy(path, folder / "ViT-B-32.pt")
    for call in (vop.load_checkpoint, vop.read_checkpoint_meta):
        with pytest.raises(CheckpointError, match=rf"ms/ViT-B-32\.pt: {msg}"):
            call(folder)
    with pytest.raises(CheckpointError, match=rf"{path}: {msg}"):
        vop.create_model("vop", path, frames=4)
    # a TorchScript archive as the authors' .pth: torch.load(weights_only=True) refuses it
    folder = make_folder(tmp_path / "ms2")
    shutil.copy(path, folder / "VoP_msrvtt9k.pth")
    with pytest.raises(CheckpointError, match=r"VoP_msrvtt9k\.pth: cannot be read with torch\.load\(weights_only=True\)"):
        vop.load_checkpoint(folder)
    assert not marker.exists()


def _vop(*args) -> subprocess.Popen:
    from test_cli_reliability import vop_script

    return subprocess.Popen([vop_script(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_hostile_archive_is_refused_by_every_command(hostile, benign, world, tmp_path):
    """Through the `vop` script: exit 2, one error line naming the archive, no traceback, no file written."""
    from vop.cli.main import main

    path, marker = hostile
    shutil.copy(path, tmp_path / "x.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(path, hf / "pytorch_model.bin")
    bad = make_folder(tmp_path / "ms_bad")
    shutil.copy(path, bad / "ViT-B-32.pt")
    good = make_folder(tmp_path / "ms_good")
    shutil.copy(benign, good / "ViT-B-32.pt")  # OpenAI's archive layout, read by the restricted reader
    videos = tmp_path / "videos"
    videos.mkdir()
    for f in sorted((world / "videos" / "test").iterdir())[:2]:
        shutil.copy(f, videos / f.name)
    assert main(["index", "--videos", str(videos), "--checkpoint", str(good), "--out", str(tmp_path / "ix"),
                 "--workers", "0", "--device", "cpu", "-q"]) == 0
    shutil.copy(path, good / "ViT-B-32.pt")  # swapped after indexing: search reads the backbone again

    common = ["--dataset", "collection", "--root", world, "--image-size", "32", "--num-workers", "0", "--device", "cpu", "-q"]
    runs = {
        "eval --backbone X.pt": (path, ["eval", "--method", "zeroshot", "--backbone", path, *common]),
        "eval --backbone X.safetensors": (tmp_path / "x.safetensors",
                                          ["eval", "--method", "zeroshot", "--backbone", tmp_path / "x.safetensors", *common]),
        "eval --backbone HF folder": (hf / "pytorch_model.bin", ["eval", "--method", "zeroshot", "--backbone", hf, *common]),
        "train model.backbone=X.pt": (path, ["train", "-q", f"model.backbone={path}", f"data.root={world}",
                                             f"out_dir={tmp_path / 'run'}", "data.dataset=collection", "model.frames=4",
                                             "model.image_size=32", "optim.epochs=1", "data.num_workers=0"]),
        "eval --checkpoint FOLDER": (bad / "ViT-B-32.pt", ["eval", "--checkpoint", bad, *common]),
        "index --checkpoint FOLDER": (bad / "ViT-B-32.pt", ["index", "--videos", videos, "--checkpoint",
                                                            bad, "--out", tmp_path / "ix2", "--workers", "0", "-q"]),
        "search after the swap": (good / "ViT-B-32.pt", ["search", tmp_path / "ix", "a red circle", "-k", "3"]),
    }
    procs = {name: (named, _vop(*args)) for name, (named, args) in runs.items()}
    for name, (named, p) in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, (name, p.returncode, out, err)
        assert "Traceback" not in out + err, (name, err)
        # search: the index's record of the backbone file refuses the swapped file before anything reads it
        why = ("TorchScript", "changed since the index") if name.startswith("search") else ("TorchScript",)
        assert err.startswith("error: ") and str(named) in err and any(w in err for w in why), (name, err)
        assert not marker.exists(), name
    assert not (tmp_path / "run" / "state.pt").exists()


# -- 3. what the reader refuses -------------------------------------------------------------------------

class _System:
    """Unpickling it runs os.system (pickle's classic payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _rezip(src: Path, dst: Path, edit=lambda name, data: data, compress=(), add=()) -> Path:
    """Copy a zip entry by entry: ``edit`` returns the new bytes or None (drop); ``compress`` names are
    deflated; ``add`` appends (name, bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for i in zin.infolist():
            data = edit(i.filename.split("/", 1)[1], zin.read(i))
            if data is not None:
                deflate = i.filename.split("/", 1)[1] in compress
                zout.writestr(i.filename, data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        for name, data in add:
            zout.writestr(name, data)
    return dst


def test_pickle_reduce_payload_is_refused(benign, tmp_path):
    marker = tmp_path / "SYSTEM"
    evil = pickle.dumps(_System(f"touch {marker}"), protocol=2)
    pickle.loads(evil)  # plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    bad = _rezip(benign, tmp_path / "evil.pt", lambda n, d: evil if n == "data.pkl" else d)
    with pytest.raises(CheckpointError, match=r"evil\.pt: .*the pickle global posix\.system, not one"):
        vop.load_clip(bad)
    # nested in the first tensor's arguments; and through a __torch__ name without a class listing
    import re

    data = zipfile.ZipFile(benign).read("ViT-B-32/data.pkl")
    for old, new, match in ((rb"ccollections\nOrderedDict\n", b"cposix\nsystem\n", r"the pickle global posix\.system"),
                            (rb"c__torch__\.openai_clip[\w.]*\nCLIP\n", b"c__torch__.os\nsystem\n",
                             r"no ViT-B-32/code/__torch__/os\.py in the archive")):
        edited = re.sub(old, new, data, count=1)
        assert edited != data
        bad = _rezip(benign, tmp_path / "evil2.pt", lambda n, d: edited if n == "data.pkl" else d)
        with pytest.raises(CheckpointError, match=match):
            read_torchscript(bad)
    assert not marker.exists()


def _damage_bytes(src: Path, dst: Path, at: float, length: int | None = None) -> Path:
    b = bytearray(src.read_bytes())
    if length is None:
        b = b[: int(len(b) * at)]
    else:
        i = int(len(b) * at)
        b[i: i + length] = bytes(x ^ 0xFF for x in b[i: i + length])
    dst.write_bytes(bytes(b))
    return dst


@pytest.mark.parametrize("damage, match", [
    (lambda s, d: _damage_bytes(s, d, 0.6), r"cannot be read as a CLIP checkpoint"),  # no central directory left
    (lambda s, d: _damage_bytes(s, d, 0.3, 64), r"damaged or unexpected content: BadZipFile: Bad CRC-32"),
    (lambda s, d: _rezip(s, d, lambda n, x: x[: len(x) // 2] if n == "data.pkl" else x), r"data\.pkl is not a whole pickle"),
    (lambda s, d: _rezip(s, d, lambda n, x: x[:-4] if n == "data/0" else x),
     r"storage 0 declares 4928 float elements \(19712 bytes\), its entry holds 19708 bytes"),
    (lambda s, d: _rezip(s, d, lambda n, x: None if n == "data/0" else x), r"no ViT-B-32/data/0 in the archive"),
    (lambda s, d: _rezip(s, d, lambda n, x: x.replace(b"(KMK@t", b"(K\xffK@t", 1) if n == "data.pkl" else x),
     r"a tensor of shape \(255, 64\) that does not fit its storage 0 \(4928 elements\)"),
    (lambda s, d: _rezip(s, d, compress=("data/0",)), r"storage ViT-B-32/data/0 is compressed"),
    (lambda s, d: _rezip(s, d, compress=("data.pkl",)), r"ViT-B-32/data\.pkl is compressed"),
    (lambda s, d: _rezip(s, d, lambda n, x: None if n.startswith("code/__torch__/torch/nn/modules/linear") else x),
     r"no ViT-B-32/code/__torch__/torch/nn/modules/linear[\w/]*\.py in the archive"),
    (lambda s, d: _rezip(s, d, lambda n, x: x.replace(b"__parameters__", b"__params__") if n.startswith("code/") else x),
     r"module class __torch__\.openai_clip[\w.]*\.CLIP does not say which attributes are parameters"),
    (lambda s, d: _rezip(s, d, lambda n, x: x.replace(b'__parameters__ = ["positional_embedding"',
                                                      b'__parameters__ = [__import__("os")') if n.startswith("code/") else x),
     r"class __torch__\.openai_clip[\w.]*\.CLIP: __parameters__ is not a list of distinct names"),
    (lambda s, d: _rezip(s, d, lambda n, x: b"(iposix\nsystem\nS'true'\ntR." if n == "data.pkl" else x), r"pickle opcode INST"),
    (lambda s, d: _rezip(s, d, add=[("ViT-B-32/data/0", b"\0" * 19712)]), r"duplicated zip entries"),
    (lambda s, d: _rezip(s, d, lambda n, x: b"big" if n == "byteorder" else x), r"big-endian tensors"),
])
def test_damaged_archives_are_refused(benign, tmp_path, damage, match):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicated name
        bad = damage(benign, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match) as e:
        vop.load_clip(bad)
    assert str(e.value).startswith(f"{bad}: ")


def _central_records(raw: bytes) -> dict[str, int]:
    """Name -> offset of its central-directory record."""
    eocd = raw.rfind(b"PK\x05\x06")
    pos, out = int.from_bytes(raw[eocd + 16: eocd + 20], "little"), {}
    while raw[pos: pos + 4] == b"PK\x01\x02":
        n, m, k = (int.from_bytes(raw[pos + o: pos + o + 2], "little") for o in (28, 30, 32))
        out[raw[pos + 46: pos + 46 + n].decode()] = pos
        pos += 46 + n + m + k
    return out


def test_overlapping_entries_are_refused(benign, tmp_path):
    """A zip whose central directory points an entry at bytes other entries hold (a zip bomb: many
    names, one big body) is refused before any storage is read or allocated."""
    raw = bytearray(benign.read_bytes())
    pos = _central_records(bytes(raw))["ViT-B-32/data/1"]
    big = len(raw) - 4096
    raw[pos + 20: pos + 28] = big.to_bytes(4, "little") * 2  # compressed and uncompressed size
    raw[pos + 42: pos + 46] = (0).to_bytes(4, "little")  # starting at the first entry
    bad = tmp_path / "bomb.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bomb\.pt: .*bytes in all in a file of \d+ bytes \(overlapping entries\)"):
        read_torchscript(bad)
    raw[pos + 20: pos + 28] = (len(raw) * 2).to_bytes(4, "little") * 2
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"entry ViT-B-32/data/1 reaches past the end of the file"):
        read_torchscript(bad)


def test_convert_hint_makes_safetensors_that_load(benign, tmp_path):
    """The command the refusal prints works (on a file one trusts)."""
    src = shutil.copy(benign, tmp_path / "trusted.pt")
    cmd = convert_hint(src)
    assert cmd.startswith('python -c "') and cmd.endswith('"')
    subprocess.run([sys.executable, "-c", cmd[len('python -c "'):-1]], check=True, capture_output=True, timeout=120)
    _same(vop.load_clip(tmp_path / "trusted.safetensors").state_dict(), vop.load_clip(benign).state_dict())


def test_no_torch_jit_load_in_the_package():
    """No call of TorchScript's loaders anywhere in vop (docstrings and messages may name them)."""
    import ast

    src = Path(vop.__file__).parent
    loaders = {"torch.jit.load", "jit.load", "torch._C.import_ir_module", "torch._C.import_ir_module_from_buffer",
               "torch.jit._load_for_lite_interpreter"}
    calls = [f"{p.relative_to(src)}:{node.lineno}" for p in src.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) in loaders]
    assert not calls, calls
