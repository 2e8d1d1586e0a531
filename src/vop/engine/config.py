"""Typed run configuration: nested dataclasses loaded from YAML plus ``a.b.c=value`` overrides.

    cfg = load_config(RunConfig, "configs/msrvtt.yaml", ["optim.lr=1e-3", "model.options.n_video=4"])
    save_config(cfg, "runs/x/config.yaml")   # load_config(RunConfig, that file) == cfg

Values (in files and overrides) are YAML with two YAML 1.2 fixes: only true/false are booleans
("yes", "on" stay strings and are rejected for bool fields), and exponent floats without a dot
(1e-3) are floats. Every field is checked against its annotation: int (at most 64 bits), float
(ints accepted; finite: no .nan or .inf), bool, str, Optional/``X | None``, Literal, list[...], dict[str, ...] (``dict[str, Any]`` is
free-form, for method options) and nested dataclasses. Mistakes raise ``vop.errors.ConfigError``
naming the key, where it came from, and what was expected.

To add a setting, add a field with a default to one of the dataclasses at the bottom. To retire
one, remove its field and list its name in the class's ``RETIRED``: saved configs keep loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, TypeVar

import yaml

from vop import limits
from vop.errors import ConfigError
from vop.limits import INT64_MAX

__all__ = [
    "load_config", "config_to_dict", "save_config", "parse_override", "check_ranges", "bounded",
    "ModelConfig", "DataConfig", "OptimConfig", "EvalConfig", "RunConfig",
]

T = TypeVar("T")


# --- YAML with YAML 1.2 booleans and floats ---------------------------------------------------

class _Loader(yaml.SafeLoader):
    pass


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    """A mapping in which a key appears twice is refused (PyYAML would silently keep the last one)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden by explicit keys
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: the constructor reports it
            continue
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _no_duplicates
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?
   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
   |[-+]?\.(?:inf|Inf|INF)
   |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Quotes every string that either YAML 1.1 or the loader above would read as non-string."""


_Dumper.yaml_implicit_resolvers = {
    ch: yaml.SafeDumper.yaml_implicit_resolvers.get(ch, []) + _Loader.yaml_implicit_resolvers.get(ch, [])
    for ch in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(_Loader.yaml_implicit_resolvers)
}


def _yaml_load(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if problem.startswith("duplicate key"):
            raise ConfigError(f"{where}{line}: {problem}; keep only one of them") from None
        raise ConfigError(f"{where}{line}: malformed YAML ({problem}); fix the syntax there") from None


# --- validation ------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _WrongType(ConfigError):
    """A value of another type than the annotation's (an Optional field tries its other alternatives)."""


def _bad(key: str, where: str, tp, value) -> ConfigError:
    hint = " (write true or false)" if tp is bool else ""
    return _WrongType(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _convert(tp, value, key: str, where: str):
    """Check ``value`` against annotation ``tp``; return it (converted: dataclasses, int->float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _bad(key, where, tp, value)
        return _build(tp, value, key, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and isinstance(value, (dict, list)):
            return _convert(options[0], value, key, where)  # keep the detailed message from inside
        detail = None  # a value of the right type but refused (a float that is not finite): that message
        for option in options:
            try:
                return _convert(option, value, key, where)
            except _WrongType:
                pass
            except ConfigError as e:
                detail = detail or e
        raise detail or _bad(key, where, tp, value)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _bad(key, where, tp, value)
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(key, where, tp, value)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, f"{key} (key {k!r})", where): _convert(vt, v, f"{key}.{k}", where)
                for k, v in value.items()}
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and abs(value) > INT64_MAX:  # would overflow inside torch/numpy, far from any meaningful setting
            raise ConfigError(f"{where}: '{key}' must be an integer of at most 64 bits (|n| < 2**63), got a "
                              f"{len(str(abs(value)))}-digit number")
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                raise ConfigError(f"{where}: '{key}' must be a finite number, got a {len(str(abs(value)))}-digit "
                                  "integer") from None
            if not math.isfinite(value):
                raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field '{key}' has an unsupported type {tp!r}")
    if not ok:
        raise _bad(key, where, tp, value)
    return value


def _unknown(key: str, name: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1) or [
        v for v in valid if len(name) >= 3 and (v.startswith(name) or name.startswith(v))][:1]
    parent = key.rpartition(".")[0]
    hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}")


def bounded(default: Any, *, min: float | None = None, max: float | None = None, min_open: bool = False,
            max_open: bool = False, null: str | None = None) -> Any:
    """A dataclass field with an allowed range, checked wherever the value comes from (file, override,
    or :func:`check_ranges` on a config built in Python). None (Optional fields) is always allowed;
    ``null`` says what it means, for the error message."""
    return field(default=default, metadata={"range": (min, min_open, max, max_open), "null": null})


def _describe_range(r: tuple) -> str:
    lo, lo_open, hi, hi_open = r
    num = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    if hi is None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {num(hi)}"
    return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"


def _check_range(f: dataclasses.Field, value: Any, key: str, where: str) -> None:
    r = f.metadata.get("range")
    if r is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, lo_open, hi, hi_open = r
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:  # (NaN fails every comparison: refused too)
        none = f" (or null: {f.metadata['null']})" if f.metadata.get("null") else ""
        low_ok = lo is None or (value > lo if lo_open else value >= lo)
        high_ok = hi is None or (value < hi if hi_open else value <= hi)
        side = (lo, lo_open, None, None) if high_ok and not low_ok else r  # too small: the lower bound is the news
        raise ConfigError(f"{where}: '{key}' must be {_describe_range(side)}{none}, got {value!r}")


def check_ranges(cfg: Any, where: str = "config", prefix: str = "") -> None:
    """Check every field of a config dataclass tree (e.g. one built in Python, not loaded) against its
    annotation (types, finite floats, 64-bit ints) and its range."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, where, key)
        else:
            _convert(hints[f.name], value, key, where)
            _check_range(f, value, key, where)


def _build(cls: type[T], data: dict, prefix: str, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    retired = getattr(cls, "RETIRED", ())
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name in retired and name not in fields:  # written by an older version: ignored
            continue
        if name not in fields:
            raise _unknown(key, str(name), list(fields), where)
        kwargs[name] = _convert(hints[name], value, key, where)
        _check_range(fields[name], kwargs[name], key, where)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{prefix + '.' if prefix else ''}{name}'")
    return cls(**kwargs)


# --- public API --------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. optim.lr=1e-3")
    return parts, _yaml_load(raw, f"override '{text}'")


def _dict_value_type(tp):
    """X for dict[str, X] (also inside Optional); Any for a bare or free-form dict."""
    for t in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,):
        if typing.get_origin(t) is dict and typing.get_args(t):
            return typing.get_args(t)[1]
    return Any


def _apply_override(cfg, text: str) -> None:
    parts, value = parse_override(text)
    where = f"override '{text}'"
    obj, tp = cfg, type(cfg)
    for depth, name in enumerate(parts):
        key = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj) if f.init]
            if name not in names:
                raise _unknown(key, name, names, where)
            tp = typing.get_type_hints(type(obj))[name]
            if last:
                value = _convert(tp, value, key, where)
                _check_range(next(f for f in dataclasses.fields(obj) if f.name == name), value, key, where)
                setattr(obj, name, value)
            elif getattr(obj, name) is None:  # Optional[SomeConfig] left at None: start from defaults
                inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
                setattr(obj, name, inner[0]() if inner else None)
            obj = getattr(obj, name)
        elif isinstance(obj, dict):  # dict[str, X]: X checks the value; free-form levels are created
            tp = _dict_value_type(tp)
            if last:
                obj[name] = _convert(tp, value, key, where)
            else:
                obj = obj.setdefault(name, {})
        else:
            raise ConfigError(f"{where}: '{'.'.join(parts[:depth])}' is {obj!r}, it has no key '{name}'")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` (a dataclass) from a YAML file (optional), then apply ``key.path=value``
    overrides in order. Raises ConfigError for a missing/malformed file, unknown keys, wrong types.
    """
    data: Any = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where}: config file not found; check the path") from None
        except OSError as e:
            raise ConfigError(f"{where}: cannot read config file ({e.strerror})") from None
        data = _yaml_load(text, where)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    cfg = _build(cls, data, "", where)
    for text in overrides:
        _apply_override(cfg, text)
    return cfg


def config_to_dict(obj) -> dict[str, Any]:
    """Plain nested dict (deep copy) of a config dataclass."""
    return dataclasses.asdict(obj)


def save_config(obj, path: str | Path) -> None:
    """Write ``obj`` as YAML; ``load_config(type(obj), path)`` gives back an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config_to_dict(obj), Dumper=_Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")


# --- the VoP run configuration -------------------------------------------------------------------
#
# Upper bounds (vop.limits, whose docstring says why each): frames, image size, batch sizes and the
# caption budget as there; at most MAX_WORKERS decoding processes and MAX_EPOCHS epochs. Every float is
# finite and every integer 64-bit wherever it comes from (_convert); what fits the machine is checked
# from a memory estimate when a run starts (vop.memory, vop.engine.trainer).

MAX_WORKERS = limits.MAX_WORKERS
MAX_EPOCHS = 100_000

@dataclass
class ModelConfig:
    method: str = "vop"              # a name in the method registry (vop, vop-f, full, zeroshot, ...)
    backbone: str = "ViT-B/32"       # an architecture name or a weights file
    backbone_arch: str | None = None  # the weights file's architecture (ViT-H-14 ...); None: its record or inferred
    tokenizer: str | None = None     # the tokenizer file of a backbone whose vocabulary vop does not ship (SigLIP: tokenizer.json); None: the one in the weights' folder
    frames: int = bounded(12, min=1, max=limits.MAX_FRAMES)  # frames sampled per video (the data pipeline reads it here)
    image_size: int | None = bounded(None, min=1, max=limits.MAX_IMAGE_SIZE, null="the backbone's resolution")  # None: the backbone's native resolution
    options: dict[str, Any] = field(default_factory=dict)  # method options: n_text, n_video, ks, depth...


@dataclass
class DataConfig:
    dataset: str = "msrvtt"          # a dataset format of vop.data.FORMATS
    root: str = ""
    train_split: str = "train"
    val_split: str | None = "val"    # None: no validation split (see val_fraction)
    test_split: str = "test"
    val_fraction: float = bounded(0.0, min=0, max=1, max_open=True)  # hold out this part of train as validation (datasets without val)
    max_words: int = bounded(32, min=3, max=limits.MAX_CONTEXT)  # caption token budget ([SOT] + words + [EOT])
    num_workers: int = bounded(2, min=0, max=MAX_WORKERS)
    augment: bool = False
    videos_dir: str | None = None    # None: ROOT/videos (or ROOT)
    max_skipped: float = bounded(0.01, min=0, max=1)  # fail when an epoch loses more than this fraction of its samples to unreadable/missing videos


@dataclass
class OptimConfig:
    epochs: int = bounded(5, min=0, max=MAX_EPOCHS)
    batch_size: int = bounded(32, min=1, max=limits.MAX_BATCH)
    # None (left out, or null): the method's declared rate (its @register rates; vop.engine.optim.resolve_rates
    # fills it in when a run starts and saves it in the run's config.yaml); a value given always wins
    lr: float | None = bounded(None, min=0, min_open=True, null="the method's declared rate")  # prompts and new modules
    backbone_lr: float | None = bounded(None, min=0, null="the method's declared rate")  # CLIP weights, for methods that train them
    weight_decay: float = bounded(0.2, min=0)
    warmup_fraction: float = bounded(0.1, min=0, max=1)  # of all optimiser steps, then cosine decay
    grad_clip: float | None = bounded(1.0, min=0, min_open=True, null="no clipping")  # max global grad norm; None: no clipping
    accumulate: int = bounded(1, min=1, max=limits.MAX_BATCH)  # gradient accumulation steps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    select_metric: str = "rsum"      # val-selection: rsum (t2v R1+R5+R10) or a key like t2v.R1


@dataclass
class EvalConfig:
    batch_size: int = bounded(64, min=1, max=limits.MAX_BATCH)
    # Optional re-scoring (vop.engine.metrics); "none" reproduces the paper's protocol.
    postprocess: Literal["none", "dsl", "qbnorm"] = "none"
    dsl_temperature: float = bounded(100.0, min=0, min_open=True)  # multiplies cosine scores: sim * softmax(100 * sim) as in X-Pool
    qb_k: int = bounded(1, min=1, max=limits.MAX_BATCH)  # QB-Norm paper defaults (Bogolin et al. 2022)
    qb_beta: float = bounded(20.0, min=0)
    every_epoch: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = bounded(0, min=0)
    out_dir: str = "runs/default"
    log_every: int = bounded(10, min=1)  # optimiser steps between log lines
    device: str = "auto"             # auto (CUDA when available), cpu, cuda
    checkpoint_every: int = bounded(0, min=0)  # optimiser steps between resumable checkpoints (0: each epoch)

    #: keys that older versions wrote into a run's config.yaml: accepted in files and ignored, so that
    #: `vop train --resume` loads old run folders. (stop_after_steps, a kill switch for tests of resume,
    #: is the test hook VOP_TEST_STOP_AFTER_STEPS of vop.engine.trainer now.)
    RETIRED: ClassVar[tuple[str, ...]] = ("stop_after_steps",)
