from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from vop.engine.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    config_to_dict,
    load_config,
    save_config,
)
from vop.errors import ConfigError


@dataclass
class Inner:
    width: int = 8
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Toy:  # string annotations (future import) of every supported kind
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "toy"
    maybe: Optional[int] = None
    pipe: int | None = 3
    mode: Literal["a", "b"] = "a"
    splits: list[str] = field(default_factory=lambda: ["train"])
    sizes: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    maybe_inner: Optional[Inner] = None


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_round_trip(tmp_path):
    assert load_config(RunConfig) == RunConfig()
    cfg = RunConfig(
        model=ModelConfig(method="vop_f", backbone="/w/ViT-B-32.safetensors", image_size=224,
                          options={"n_video": 4, "ks": 8, "nested": {"a": [1, 2.5, None]}, "s": "yes"}),
        data=DataConfig(root="/data/msrvtt", val_split=None, val_fraction=0.05, augment=True),
        optim=OptimConfig(lr=3e-3, backbone_lr=1e-7, grad_clip=None, precision="bf16"),
        seed=7, out_dir="null",  # strings that look like other YAML types must survive
    )
    cfg.data.dataset = "1e-3"
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    back = load_config(RunConfig, path)
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert type(back.optim.weight_decay) is float and back.data.dataset == "1e-3"


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, "seed: 3\noptim:\n  lr: 1e-2\n  epochs: 2\neval:\n  postprocess: dsl\n")
    cfg = load_config(RunConfig, path, ["optim.lr=1e-3", "model.options.n_video=4", "seed=5"])
    assert cfg.seed == 5 and cfg.optim.epochs == 2 and cfg.optim.lr == 1e-3
    assert cfg.eval.postprocess == "dsl" and cfg.model.options == {"n_video": 4}
    assert cfg.optim.batch_size == 32  # untouched default


def test_overrides_of_every_type():
    cfg = load_config(Toy, overrides=[
        "n=4", "x=1e-3", "flag=true", "name=hello world", "maybe=7", "pipe=null", "mode=b",
        "splits=[train,val]", "sizes=[1, 2]", "options.n_text=8", "options.deep.er=[1, x]",
        "inner.width=16", "inner.names=[]", "maybe_inner.width=2",
    ])
    assert cfg == Toy(n=4, x=1e-3, flag=True, name="hello world", maybe=7, pipe=None, mode="b",
                      splits=["train", "val"], sizes=[1, 2],
                      options={"n_text": 8, "deep": {"er": [1, "x"]}},
                      inner=Inner(width=16, names=[]), maybe_inner=Inner(width=2))
    cfg = load_config(Toy, overrides=["x=2", "flag=false", "options={a: 1}", "inner={width: 4}"])
    assert cfg.x == 2.0 and type(cfg.x) is float and cfg.flag is False
    assert cfg.options == {"a": 1} and cfg.inner == Inner(width=4)


def test_optional_none(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, "data:\n  val_split: null\noptim:\n  grad_clip: ~\n"))
    assert cfg.data.val_split is None and cfg.optim.grad_clip is None
    cfg = load_config(RunConfig, overrides=["model.image_size=224", "optim.grad_clip=0.5"])
    assert cfg.model.image_size == 224 and cfg.optim.grad_clip == 0.5


def test_unknown_key_top_level(tmp_path):
    path = write(tmp_path, "optm:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert str(path) in msg and "'optm'" in msg and "Did you mean 'optim'" in msg
    assert "model, data, optim, eval, seed, out_dir, log_every" in msg


def test_retired_key_of_old_run_folders_is_ignored(tmp_path):
    """Run folders of older versions saved ``stop_after_steps`` (now the test hook
    VOP_TEST_STOP_AFTER_STEPS): their config.yaml still loads, the key is dropped, and it is no setting."""
    save_config(RunConfig(seed=3), tmp_path / "new.yaml")
    new = (tmp_path / "new.yaml").read_text()
    assert "stop_after_steps" not in new
    for value in ("null", "5"):
        old = write(tmp_path, new + f"stop_after_steps: {value}\n")
        assert load_config(RunConfig, old) == RunConfig(seed=3)
    assert "stop_after_steps" not in config_to_dict(RunConfig())
    with pytest.raises(ConfigError, match="unknown key 'stop_after_steps'"):
        load_config(RunConfig, overrides=["stop_after_steps=5"])
    with pytest.raises(ConfigError, match="unknown key 'optim.stop_after_steps'"):  # only where it was
        load_config(RunConfig, write(tmp_path, "optim:\n  stop_after_steps: 5\n"))


def test_unknown_key_nested(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*Did you mean 'optim.lr'") as e:
        load_config(RunConfig, path)
    assert str(path) in str(e.value) and "backbone_lr" in str(e.value)
    with pytest.raises(ConfigError, match=r"override 'optim.warmup=0.2'.*'optim.warmup'.*'optim.warmup_fraction'"):
        load_config(RunConfig, overrides=["optim.warmup=0.2"])
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*Did you mean 'seed'"):
        load_config(RunConfig, overrides=["sed=1"])
    with pytest.raises(ConfigError, match="no key"):
        load_config(RunConfig, overrides=["seed.x=1"])


@pytest.mark.parametrize("override, words", [
    ("optim.epochs=abc", ["'optim.epochs'", "int", "'abc'"]),
    ("optim.epochs=1.5", ["'optim.epochs'", "int", "1.5"]),
    ("optim.epochs=true", ["'optim.epochs'", "int", "True"]),
    ("data.augment=yes", ["'data.augment'", "bool", "'yes'"]),
    ("data.augment=1", ["'data.augment'", "bool", "1"]),
    ("optim.lr=[1, 2]", ["'optim.lr'", "float", "[1, 2]"]),
    ("optim.lr=fast", ["'optim.lr'", "float", "'fast'"]),
    ("optim.precision=fp64", ["'optim.precision'", "one of", "'bf16'", "'fp64'"]),
    ("model.backbone=32", ["'model.backbone'", "str", "32"]),
    ("model.image_size=big", ["'model.image_size'", "int | None", "'big'"]),
    ("model.options=[1]", ["'model.options'", "dict", "[1]"]),
    ("model=3", ["'model'", "ModelConfig", "3"]),
])
def test_wrong_types(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, overrides=[override])
    msg = str(e.value)
    assert f"override '{override}'" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_wrong_types_in_file_and_lists(tmp_path):
    path = write(tmp_path, "eval:\n  postprocess: qb\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: 'eval.postprocess' must be one of"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match=r"'sizes\[1\]' must be int, got 'x'"):
        load_config(Toy, overrides=["sizes=[1, x]"])
    with pytest.raises(ConfigError, match=r"'maybe_inner.widht'"):
        load_config(Toy, overrides=["maybe_inner={widht: 2}"])


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(RunConfig, missing)
    bad = write(tmp_path, "seed: 1\noptim:\n  lr: 0.1: 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: malformed YAML"):
        load_config(RunConfig, bad)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert load_config(RunConfig, write(tmp_path, "", "empty.yaml")) == RunConfig()
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(RunConfig, overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(RunConfig, overrides=["optim.lr=[1,"])
