"""Bounds before allocation (issue 23, part 2): every number a file, an option or a config gives is checked
for type, finiteness and range before anything is built, numbers are compared with the tensors present,
and a model or training step that cannot fit the machine's memory is refused with the setting to lower.

Each class of hostile input goes through the `vop` console script once (a subprocess whose address space
is capped at 3 GiB: an attempted 512 TB tensor, a 7 GiB decode or a 100,000-layer build fails the test
instead of passing) and through the library or ``vop.cli.main.main`` in-process for the variants, under
the same kind of cap (``capped_memory``). Then valid values at the bounds still work, and the memory
estimate is compared with a measured training step.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vop
from vop import limits
from vop.cli.main import main
from vop.errors import CheckpointError, ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_methods_modelscope import HYPER, make_folder  # noqa: E402

CAP = 3 << 30  # the address-space cap of the `vop` subprocesses
TINY_TRAIN = ["model.backbone=tiny", "data.dataset=collection", "model.frames=2", "model.image_size=32",
              "data.num_workers=0", "optim.epochs=1", "optim.batch_size=8"]


def vop_script() -> str:
    exe = shutil.which("vop", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return exe


def run_capped(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))
    return subprocess.run([vop_script(), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=cap)


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> str:
    both = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in both and r.stderr.startswith("error: "), (r.returncode, both)
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


@contextlib.contextmanager
def capped_memory(extra: int = 2 << 30):
    """This process may grow by at most ``extra`` bytes of address space inside the block: a huge allocation
    raises instead of succeeding (or swapping), so a check that comes too late fails the test."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_main(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with capped_memory():
        rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# -- 1. the authors' ModelScope folders ------------------------------------------------------------------

def _folder(tmp_path, name, hyper=None, edit_state=None) -> Path:
    d = make_folder(tmp_path / name, hyper={**HYPER, **(hyper or {})})
    if edit_state is not None:
        obj = torch.load(d / "VoP_msrvtt9k.pth", weights_only=True)
        edit_state(obj["state_dict"])
        torch.save(obj, d / "VoP_msrvtt9k.pth")
    return d


def test_modelscope_folder_numbers_through_the_console_script(tmp_path, world):
    d = _folder(tmp_path, "huge", {"vp_token_num": 10**12})  # was: a 512 TB allocation
    r = run_capped("eval", "--checkpoint", d, "--dataset", "collection", "--root", world, "--num-workers", "0")
    assert_refused(r, f"{d / 'configuration.json'}: hyperparam vp_token_num must be an integer in 0..1024, got 1000000000000")


@pytest.mark.parametrize("hyper,edit,err,match", [
    ({"vp_token_num": 10**400}, None, CheckpointError,  # was: TypeError from randn
     r"configuration\.json: hyperparam vp_token_num must be an integer in 0\.\.1024, got 1000.*\(401 characters\)"),
    ({"num_frames": 10**9}, None, CheckpointError,  # was: a 7.45 GiB decode
     r"configuration\.json: hyperparam num_frames must be an integer in 1\.\.1024, got 1000000000"),
    ({"input_res": 10**6}, None, CheckpointError, r"hyperparam input_res must be an integer in 1\.\.4096"),
    ({"vp_token_num": 1000}, None, CheckpointError,  # within bounds, but not what the tensors hold
     r"visual_prompt_learner\.visual_prompts has shape \(2, 1, 3, 64\), expected \(2, 1, 1000, 64\)"),
    ({"tp_prefix_token_num": 40, "tp_suffix_token_num": 40}, None, CheckpointError,
     r"text_prompt_learner\.text_prompts has shape \(2, 4, 64\), expected \(2, 80, 64\)"),
    ({}, lambda sd: sd.__setitem__(5, torch.zeros(1)), CheckpointError,  # was: AttributeError
     r"VoP_msrvtt9k\.pth: a tensor is stored under the key 5 \(int\), not a name"),
])
def test_modelscope_folder_numbers_are_checked_before_anything_is_built(tmp_path, hyper, edit, err, match):
    d = _folder(tmp_path, "bad", hyper, edit)
    with capped_memory(), pytest.raises(err, match=match):
        vop.load_checkpoint(d)


def test_modelscope_prompt_counts_must_fit_the_text_context(tmp_path):
    """75 text prompts on a 77-token context leave 2 positions: refused by vop's own option check."""
    g = torch.Generator().manual_seed(1)
    d = _folder(tmp_path, "long", {"tp_prefix_token_num": 70, "tp_suffix_token_num": 5},
                lambda sd: sd.__setitem__("module.text_prompt_learner.text_prompts", torch.randn(2, 75, 64, generator=g)))
    with capped_memory(), pytest.raises(ConfigError, match=r"n_text of vop must be an integer in 0\.\.74, got 75"):
        vop.load_checkpoint(d)


# -- 2. architecture records and head counts ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.contiguous() for k, v in vop.build_clip("tiny", seed=0).state_dict().items()}


def _with_record(tmp_path, sd, record, name="rec") -> Path:
    from safetensors.torch import save_file

    p = tmp_path / f"{name}.safetensors"
    save_file(sd, str(p), metadata={"vop_clip_config": record if isinstance(record, str) else json.dumps(record)})
    return p


def _record(**change) -> dict:
    d = copy.deepcopy(vop.get_arch("tiny").to_dict())
    for key, value in change.items():
        tower, _, field = key.rpartition("__")
        (d[tower] if tower else d)[field] = value
    return d


def test_an_architecture_record_through_the_console_script(tmp_path, world, tiny_sd):
    p = _with_record(tmp_path, tiny_sd, _record(vision__layers=100_000))  # was: minutes of CPU building it
    t = time.perf_counter()
    r = run_capped("eval", "--method", "zeroshot", "--backbone", p, "--dataset", "collection", "--root", world, timeout=60)
    assert_refused(r, f"{p}: its architecture record (metadata vop_clip_config) is not usable: "
                      "architecture vision.layers must be an integer in 1..256, got 100000")
    assert time.perf_counter() - t < 30


@pytest.mark.parametrize("record,match", [
    ("{not json", r"is not valid JSON"),  # was: JSONDecodeError
    (_record(vision__foo=1), r"architecture vision has unknown key\(s\) foo"),  # was: TypeError
    (_record(vision__heads=3), r"vision\.width 64 is not divisible by vision\.heads 3"),  # was: ValueError
    (_record(vision__width=10**9), r"vision\.width must be an integer in 1\.\.16384, got 1000000000"),  # RuntimeError
    (_record(embed_dim=-1), r"embed_dim must be an integer in 1\.\.16384, got -1"),  # was: RuntimeError
    (_record(text__layers=100_000), r"text\.layers must be an integer in 1\.\.256"),
    (_record(text__context_length=2), r"text\.context_length must be an integer in 3\.\.4096"),
    (_record(vision__image_size=36), r"vision\.image_size 36 is not a multiple of vision\.patch_size 8"),
    (_record(vision__heads="2"), r"vision\.heads must be an integer in 1\.\.64, got '2' \(str\)"),
    (_record(vision__heads=True), r"vision\.heads must be an integer in 1\.\.64, got True \(bool\)"),
    (_record(vision__mlp_ratio=float("nan")), r"vision\.mlp_ratio must be a finite number > 0, got nan"),
    (_record(act="relu"), r"act must be one of quick_gelu, gelu, got 'relu'"),
    ([1, 2], r"architecture must be a mapping of sizes, got list"),
    (_record(vision__layers=3), r"does not fit the architecture .*resblocks\.2\.\S+ is missing"),  # valid, not the tensors
])
def test_architecture_records_are_checked_then_compared_with_the_tensors(tmp_path, tiny_sd, record, match):
    p = _with_record(tmp_path, tiny_sd, record)
    with capped_memory(), pytest.raises(CheckpointError, match=match) as e:
        vop.load_clip(p)
    assert str(e.value).startswith(str(p))


@pytest.mark.parametrize("config,match", [
    ({"vision_config": {"hidden_size": 10**9}}, r"vision\.width must be an integer in 1\.\.16384"),
    ({"vision_config": {"num_hidden_layers": 100_000}}, r"vision\.layers must be an integer in 1\.\.256"),
    ({"vision_config": {"hidden_size": 0}}, r"vision_config\.hidden_size must be an integer >= 1, got 0"),  # was: ZeroDivisionError
    ({"text_config": {"vocab_size": 1.5}}, r"text_config\.vocab_size must be an integer >= 1, got 1\.5"),
    ({"vision_config": "x"}, r"vision_config must be an object, got str"),  # was: AttributeError
    ([1], r"config\.json must be a JSON object, got list"),
])
def test_hugging_face_configs_are_checked(config, match):
    from vop.backbone.checkpoint import _hf_config

    with pytest.raises(CheckpointError, match=match):
        _hf_config(config)


@pytest.mark.parametrize("heads,match", [
    ((0, 0), r"heads=: the vision head count must be an integer in 1\.\.16384, got 0"),  # was: ZeroDivisionError
    ((-1, -1), r"got -1"),  # was: accepted
    ((True, 2), r"got True \(bool\)"),
    (("a", 2), r"got 'a' \(str\)"),
    ((2,), r"heads= must be \(vision_heads, text_heads\)"),
    ((3, 2), r"heads=\(3, 2\) do not fit these tensors: .*vision\.width 64 is not divisible by vision\.heads 3"),
])
def test_head_counts_are_checked(tmp_path, tiny_sd, heads, match):
    p = tmp_path / "plain.pt"
    torch.save(tiny_sd, p)
    with pytest.raises(CheckpointError, match=match):
        vop.load_clip(p, heads=heads)
    assert (vop.load_clip(p, heads=(1, 4)).cfg.vision.heads, vop.load_clip(p).cfg.vision.heads) == (1, 2)


def test_prompt_checkpoint_metadata_is_checked_against_its_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    good = vop.save_checkpoint(vop.create_model("vop", "tiny", frames=4), tmp_path / "p.safetensors",
                               extra={"backbone": "tiny"})
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["vop"]), {k: f.get_tensor(k) for k in f.keys()}

    def write(name, **change):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"vop": json.dumps({**meta, **change})})
        return path

    with capped_memory():
        for change, err, match in (
            ({"options": {**meta["options"], "n_video": 1000}}, CheckpointError,
             r"text_prompts\.tokens|video_prompts\.source\.shared has shape \(2, 8, 64\), but its metadata"),
            ({"options": {**meta["options"], "n_video": 10**12}}, CheckpointError, r"n_video of vop must be an integer in 0\.\.1024"),
            ({"frames": 10**9}, CheckpointError, r"the frames per video its metadata records must be an integer in 1\.\.1024"),
            ({"arch": {**meta["arch"], "embed_dim": 10**9}}, CheckpointError, r"embed_dim must be an integer in 1\.\.16384"),
            ({"options": "x"}, CheckpointError, r"lacks a valid 'options'"),
        ):
            with pytest.raises(err, match=match):
                vop.load_checkpoint(write("bad", **change))
    assert torch.equal(vop.load_checkpoint(good).video_prompts.source.shared, tensors["video_prompts.source.shared"])


# -- 3. method options -----------------------------------------------------------------------------------------

def test_method_options_through_the_console_script(world, tmp_path):
    r = run_capped("train", f"data.root={world}", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, "model.method=dgl",
                   "model.options.n_local=100000000")  # was: checked on the meta device, died in the allocator
    assert_refused(r, "model.options.n_local of dgl must be an integer in 0..1024, got 100000000")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method,option,words", [
    ("cma", "r=1000000000000", "cma: r must be an integer in 1..16384, got 1000000000000"),
    ("mv-adapter", "cmt_layers=5", "mv-adapter option cmt_layers must be a list (list[int]), got 5 (int)"),  # TypeError
    ("mv-adapter", "cmt_layers=[0.5]", "mv-adapter option cmt_layers[0] must be an integer"),
    ("mv-adapter", "cmt_layers=[7]", "cmt_layers entry 7 is not a layer of the 2-layer visual tower"),
    ("mv-adapter", "scale=abc", "mv-adapter option scale must be a finite number, got 'abc'"),  # failed at forward
    ("mv-adapter", "scale=.nan", "mv-adapter option scale must be a finite number, got nan"),  # NaN similarity
    ("mv-adapter", "mid=100000", "model.options.mid of mv-adapter must be an integer in 1..16384"),
    ("mv-adapter", "factor_dim=10000000000", "model.options.factor_dim of mv-adapter must be an integer in 0..16384"),
    ("vop", "n_text=100", "model.options.n_text of vop must be an integer in 0..74, got 100"),  # failed at run time
    ("vop", "n_video=1000000000", "model.options.n_video of vop must be an integer in 0..1024"),
    ("vop", "depth=1000", "model.options.depth of vop must be an integer in 0..256"),
    ("vop", "n_text=1" + "0" * 400, "vop option n_text must be an integer (of at most 64 bits"),
    ("vop-c", "context_hidden=1000000000", "model.options.context_hidden of vop-c must be an integer in 1..16384"),
    ("vop-f", "frame_position_std=.inf", "vop-f option frame_position_std must be a finite number, got inf"),
    ("dgl", "n_text=100", "model.options.n_text of dgl must be an integer in 0..74"),
    ("dgl", "n_global=5000", "model.options.n_global of dgl must be an integer in 0..1024"),
    ("adapter-attn", "hidden=10000000000", "model.options.hidden of adapter-attn must be an integer in 1..16384"),
    ("partial", "vision_blocks=1000", "model.options.vision_blocks of partial must be an integer in 0..256"),
    ("cma", "tau=.inf", "cma option tau must be a finite number, got inf"),
])
def test_method_options_are_checked_before_any_weights_load(world, tmp_path, capsys, monkeypatch, method, option, words):
    import vop.engine.trainer as trainer

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the options were checked")

    monkeypatch.setattr(trainer, "resolve_backbone", no_weights)
    rc, err = run_main(["train", "-q", f"data.root={world}", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN,
                        f"model.method={method}", f"model.options.{option}"], capsys)
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err and words in err, err


def test_options_at_their_bounds_still_build_and_run(tiny_clip):
    tokens = torch.tensor([[49406, 320, 49407]])  # [SOT] a [EOT]: the shortest caption
    with torch.no_grad():
        m = vop.create_model("vop", tiny_clip, frames=2, n_text=74)  # 74 prompts + 3 tokens = CLIP's 77
        assert m.max_text_tokens == 3 and m.encode_text(tokens).shape == (1, 64)
        d = vop.create_model("dgl", tiny_clip, frames=2, n_text=74, depth=256)  # depth beyond the layers: all of them
        assert d.depth == 2 and d.encode_text(tokens).shape == (1, 64)
    mv = vop.create_model("mv-adapter", tiny_clip, frames=2, cmt_layers=(-1, 0), scale=1)
    assert mv.opts.cmt_layers == [-1, 0] and mv.opts.scale == 1.0 and isinstance(mv.opts.scale, float)
    assert vop.count_parameters("vop", "tiny", frames=limits.MAX_FRAMES)["trainable"] > 0


def test_new_tensors_that_cannot_fit_name_the_options(tiny_clip, monkeypatch):
    import vop.memory

    monkeypatch.setattr(vop.memory, "available_memory", lambda device="cpu": 64 << 20)
    with capped_memory(), pytest.raises(ConfigError, match=r"mv-adapter's new tensors \(53,340,512 float32 parameters\): "
                                        r"about 203\.5 MiB .* only 64\.0 MiB is available on cpu: lower "
                                        r"model\.options\.mid=1024 \(default 64\)$"):
        vop.create_model("mv-adapter", tiny_clip, frames=4, mid=1024, heads=2)
    with pytest.raises(ConfigError, match=r"lower model\.options\.n_local=1000 \(default 4\), model\.frames=1024$"):
        vop.create_model("dgl", tiny_clip, frames=1024, n_local=1000)
    vop.create_model("mv-adapter", tiny_clip, frames=4)  # the default fits
    with pytest.raises(ConfigError, match=r"the CLIP backbone ViT-B-32 \(151,277,313 float32 parameters\)"):
        vop.build_clip("ViT-B-32")


# -- 4. run configs and command-line options ----------------------------------------------------------------------

def test_a_huge_frame_count_through_the_console_script(world, tmp_path):
    r = run_capped("train", f"data.root={world}", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, "model.frames=1000000000")
    assert_refused(r, "'model.frames' must be in [1, 1024], got 1000000000")
    r = run_capped("eval", "--method", "zeroshot", "--backbone", "tiny", "--dataset", "collection", "--root", world,
                   "--frames", "1000000000")
    assert_refused(r, "--frames must be at most 1024, got 1000000000; vop samples at most 1024 frames per video")


@pytest.mark.parametrize("override,words", [
    ("optim.lr=.inf", "'optim.lr' must be a finite number, got inf"),
    ("optim.weight_decay=.nan", "'optim.weight_decay' must be a finite number, got nan"),
    ("eval.dsl_temperature=1e400", "'eval.dsl_temperature' must be a finite number, got inf"),
    ("optim.backbone_lr=1" + "0" * 400, "'optim.backbone_lr' must be a finite number, got a 401-digit integer"),
    ("seed=1" + "0" * 400, "'seed' must be an integer of at most 64 bits (|n| < 2**63), got a 401-digit number"),
    ("eval.batch_size=1000000000000", "'eval.batch_size' must be in [1, 1048576], got 1000000000000"),
    ("optim.batch_size=2000000", "'optim.batch_size' must be in [1, 1048576]"),
    ("model.image_size=100000", "'model.image_size' must be in [1, 4096] (or null: the backbone's resolution)"),
    ("data.max_words=100000", "'data.max_words' must be in [3, 4096]"),
    ("data.num_workers=100000", "'data.num_workers' must be in [0, 256]"),
    ("optim.epochs=100000000000000", "'optim.epochs' must be in [0, 100000]"),
    ("eval.qb_k=10000000000", "'eval.qb_k' must be in [1, 1048576]"),
])
def test_run_config_values_are_bounded(override, words):
    from vop.engine.config import RunConfig, load_config

    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, [override])
    assert words in str(e.value), str(e.value)


def test_configs_built_in_python_are_checked_too():
    from vop.engine.config import RunConfig, check_ranges

    for change, words in ((lambda c: setattr(c.model, "frames", 10**9), "'model.frames' must be in [1, 1024]"),
                          (lambda c: setattr(c.optim, "lr", float("inf")), "'optim.lr' must be a finite number"),
                          (lambda c: setattr(c.model, "frames", "12"), "'model.frames' must be int, got '12'")):
        cfg = RunConfig()
        change(cfg)
        with pytest.raises(ConfigError) as e:
            check_ranges(cfg)
        assert words in str(e.value), str(e.value)


def test_run_config_values_at_the_bounds_load():
    from vop.engine.config import RunConfig, load_config

    cfg = load_config(RunConfig, None, ["model.frames=1024", "model.image_size=4096", "optim.batch_size=1048576",
                                        "eval.batch_size=1048576", "data.max_words=4096", "seed=9223372036854775807",
                                        "optim.epochs=100000", "data.num_workers=256"])
    assert (cfg.model.frames, cfg.optim.batch_size, cfg.seed) == (1024, 1 << 20, (1 << 63) - 1)


@pytest.mark.parametrize("args,words", [
    (["eval", "--method", "zeroshot", "--backbone", "tiny", "--dataset", "collection", "--root", "W", "--batch-size",
      "1000000000"], "--batch-size must be at most 1048576, got 1000000000"),
    (["eval", "--method", "zeroshot", "--backbone", "tiny", "--dataset", "collection", "--root", "W", "--image-size",
      "100000"], "--image-size must be at most 4096, got 100000"),
    (["eval", "--method", "zeroshot", "--backbone", "tiny", "--dataset", "collection", "--root", "W", "--num-workers",
      "100000"], "--num-workers must be at most 256, got 100000"),
    (["eval", "--method", "zeroshot", "--backbone", "tiny", "--dataset", "collection", "--root", "W", "--frames", "1024",
      "--image-size", "4096", "--batch-size", "16", "--num-workers", "0"],
     "a batch of 16 videos of 1024 frames at 4096 px: about 6.0 TiB"),  # all within bounds, together impossible
    (["index", "--videos", "W", "--checkpoint", "x", "--out", "O", "--frames", "1000000000"],
     "--frames must be at most 1024, got 1000000000"),
    (["index", "--videos", "W", "--checkpoint", "x", "--out", "O", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["index", "--videos", "W", "--checkpoint", "x", "--out", "O", "--thumb-height", "100000"],
     "--thumb-height must be at most 4096"),
    (["index", "--videos", "W", "--checkpoint", "x", "--out", "O", "--nlist", "0"], "--nlist must be >= 1, got 0"),
    (["search", "I", "q", "-k", "100000000"], "-k must be at most 1048576"),
    (["data", "cache", "-d", "collection", "-r", "W", "-o", "O", "--frames", "1000000000"], "--frames must be at most 1024"),
    (["data", "cache", "-d", "collection", "-r", "W", "-o", "O", "--size", "100000"], "--size must be at most 4096"),
    (["data", "verify", "-d", "collection", "-r", "W", "--frames", "1000000000"], "--frames must be at most 1024"),
    (["params", "--frames", "1000000000"], "--frames must be at most 1024, got 1000000000"),
    (["pretrain", "-o", "O.safetensors", "--lr", "nan"], "--lr must be > 0, got nan"),
    (["pretrain", "-o", "O.safetensors", "--batch-size", "1048576", "--size", "4096", "--arch", "tiny"],
     "a pretraining step of 1048576 stills: about"),
])
def test_command_line_numbers_are_bounded(world, tmp_path, capsys, args, words):
    args = [str(world) if a == "W" else str(tmp_path / a) if a in ("O", "O.safetensors", "I") else a for a in args]
    rc, err = run_main(args, capsys)
    assert rc == 2 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "O").exists() and not (tmp_path / "O.safetensors").exists()


# -- 5. the memory of a training step -----------------------------------------------------------------------------

def test_a_step_that_cannot_fit_is_refused_with_the_settings_to_lower(world, tmp_path):
    r = run_capped("train", f"data.root={world}", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, "model.frames=1024",
                   "model.image_size=4096", "optim.batch_size=1048576")
    err = assert_refused(r, "training vop on tiny: about", "activations", "1048576 videos x 1024 frames x 262153 image tokens",
                         "lower optim.batch_size (1048576; or raise optim.accumulate, 1), model.frames (1024) or "
                         "model.image_size (4096), or set optim.grad_checkpointing=true")
    assert "PiB" in err and not (tmp_path / "run").exists()


def test_the_step_estimate_counts_what_the_method_trains(tiny_clip):
    from vop.memory import estimate_model_step, kept_blocks

    def kept(method, **options):
        m = vop.create_model(method, tiny_clip, frames=2, **options)
        return kept_blocks(m, "visual"), kept_blocks(m, "text")

    assert kept("vop") == ((2, 0), (2, 0))  # prompts from the first layer: every block, frozen weights
    assert kept("vop", depth=1, prompt_from="output") == ((1, 0), (1, 0))  # the last layer only
    assert kept("vop", n_video=0) == ((0, 0), (2, 0))  # text prompts only
    assert kept("vop-f", ks=1) == ((2, 0), (2, 0)) and kept("vop-f", ks=1, n_video=0) == ((1, 0), (2, 0))
    assert kept("full") == ((0, 2), (0, 2)) and kept("bias") == ((2, 0), (2, 0))
    assert kept("partial") == ((0, 1), (0, 0)) and kept("proj") == kept("zeroshot") == ((0, 0), (0, 0))
    assert kept("dgl", n_text=0) == ((2, 0), (0, 0)) and kept("cma") == ((2, 0), (2, 0))

    m = vop.create_model("vop", tiny_clip, frames=4)
    est = estimate_model_step(m, batch=8, frames=4, image_size=32, text_tokens=16)
    d, mlp = 64, 256
    a = 6 * d + 2 * mlp  # QuickGELU, frozen weights
    video, text = 8 * 4 * (1 + 16 + 8) * 2 * a, 8 * (16 + 8) * 2 * a
    trainable = m.parameter_counts()["trainable"]
    assert est["activations"] == 4 * (video + text)
    assert est["total"] == 4 * sum(p.numel() for p in m.parameters()) + 2 * 4 * 8 * 4 * 3 * 32 * 32 + 8 * trainable \
        + max(4 * (video + text), 4 * trainable)
    gc = estimate_model_step(m, batch=8, frames=4, image_size=32, text_tokens=16, grad_checkpointing=True)
    assert gc["activations"] == 4 * (8 * 4 * 25 * (2 * d + a) + 8 * 24 * (2 * d + a)) < est["activations"]


@pytest.mark.parametrize("method", ["vop", "full"])
def test_the_step_estimate_is_a_lower_bound_within_a_factor_of_two_of_a_measured_step(method):
    """A real step's peak memory (tests/scripts/step_memory.py, a fresh process) is 1-2x the estimate: the
    estimate never refuses a step that fits (it is a lower bound), and is not far below the truth."""
    script = Path(__file__).parent / "scripts" / "step_memory.py"
    r = subprocess.run([sys.executable, str(script), method, "tiny-4l", "96", "16", "4"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["estimate"] > 50 << 20, out  # a step large enough to measure (100-200 MB)
    assert 1.0 <= out["ratio"] <= 2.0, out


def test_available_memory_and_the_check():
    from vop.memory import available_memory, check_fits

    free = available_memory("cpu")
    assert isinstance(free, int) and free > 0
    assert available_memory("meta") is None
    check_fits(1024, "cpu", "a kilobyte", "never")
    with pytest.raises(ConfigError, match=r"^a petabyte: about 909\.5 TiB \(1,000,000,000,000,000 bytes\) needed, but only "
                                          r".* is available on cpu: buy memory$"):
        check_fits(10**15, "cpu", "a petabyte", lambda: "buy memory")


def test_parameter_count_matches_the_built_model():
    from vop.backbone.clip import CLIP
    from vop.backbone.config import parameter_count

    for name in vop.list_archs():
        cfg = vop.get_arch(name)
        with torch.device("meta"):
            built = sum(p.numel() for p in CLIP(cfg).parameters())
        assert parameter_count(cfg) == built, name
