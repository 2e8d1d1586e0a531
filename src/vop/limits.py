"""Bounds on every number a user or a file gives vop, checked before anything is built or allocated.

One place for the limits and for the small checks that apply them; the architecture checks
(:mod:`vop.backbone.config`), the method options (:mod:`vop.methods.registry`), the run config
(:mod:`vop.engine.config`), the ModelScope reader and the CLI use them. The numbers are sanity bounds,
far above anything real (each is several times the largest value a shipped architecture or config
uses) and low enough that nothing within them reaches the allocator with an absurd size; what fits
*this* machine is then checked from the memory a model and a training step need
(:func:`vop.runtime.check_memory`).

Architectures (a CLIPConfig, from the registry, a file's record or Hugging Face's config.json):

- ``MAX_LAYERS`` 256 blocks per tower (the largest shipped tower, ViT-e-14's, has 56);
- ``MAX_WIDTH`` 16384 (tower width and embedding dim; shipped at most 1792; GPT-3 is 12288 wide);
- ``MAX_MLP_WIDTH`` 65536 (4 x MAX_WIDTH; shipped at most 15360);
- ``MAX_IMAGE_SIZE`` 4096 px (shipped at most 378), a multiple of the patch size;
- ``MAX_CONTEXT`` 4096 text positions (CLIP: 77); at least ``MIN_CAPTION`` = 3 ([SOT], a word, [EOT]);
- ``MAX_VOCAB`` 1,000,000 tokens (CLIP's BPE: 49,408);
- heads: at least 1 and dividing the width.

Runs and inputs: ``MAX_FRAMES`` 1024 frames per video (16 x the 64 of the shipped ActivityNet
configs); ``MAX_BATCH`` 1,048,576 videos per batch; ``MAX_PROMPT_TOKENS`` 1024 prompt tokens of one
kind per frame, video or layer (the methods use 1..16). Every integer fits int64 (a 401-digit number
is refused by name instead of overflowing inside torch) and every float is finite.
"""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from vop.errors import ConfigError

MAX_LAYERS = 256
MAX_WIDTH = 16384
MAX_MLP_WIDTH = 4 * MAX_WIDTH
MAX_IMAGE_SIZE = 4096
MAX_CONTEXT = 4096
MIN_CAPTION = 3  # [SOT], one word, [EOT]
MAX_VOCAB = 1_000_000
MAX_FRAMES = 1024
MAX_BATCH = 1 << 20
MAX_PROMPT_TOKENS = 1024
INT64_MAX = (1 << 63) - 1


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None, error: type = ConfigError,
              why: str = "") -> int:
    """``value`` as an int in ``lo..hi`` (an int, not a bool, float or string); ``error`` naming ``name``
    otherwise. ``why``: what the bounds are (appended to the message)."""
    hi_eff = INT64_MAX if hi is None else hi
    lo_eff = -INT64_MAX if lo is None else lo
    if not is_int(value) or not lo_eff <= value <= hi_eff:
        if lo is not None and hi is not None:
            want = f"an integer in {lo}..{hi}"
        elif lo is not None:
            want = f"an integer >= {lo}" + (f" (at most {hi_eff})" if is_int(value) and value > hi_eff else "")
        elif hi is not None:
            want = f"an integer <= {hi}"
        else:
            want = "an integer (of at most 64 bits: below 2**63)"
        raise error(f"{name} must be {want}, got {_show(value)}{' (' + type(value).__name__ + ')' if not is_int(value) else ''}"
                    f"{'; ' + why if why else ''}")
    return value


def check_float(value: Any, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                error: type = ConfigError) -> float:
    """``value`` as a finite float in the range (ints accepted); ``error`` naming ``name`` otherwise."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        rng = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "", f"<= {hi:g}" if hi is not None else ""]
        rng_text = " and ".join(r for r in rng if r)
        raise error(f"{name} must be a finite number{' ' + rng_text if rng_text else ''}, got {_show(value)}")
    return float(value)


# -- annotations ------------------------------------------------------------------------------------

def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def resolve_hints(cls: type) -> dict[str, Any]:
    """The field annotations of a dataclass as types (also for string annotations of classes made by
    ``dataclasses.make_dataclass`` from fields declared under ``from __future__ import annotations``)."""
    import dataclasses

    try:
        return typing.get_type_hints(cls)
    except Exception:
        pass
    ns = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "tuple": tuple, "dict": dict,
          "None": None, "Any": Any, "Literal": Literal, "Optional": typing.Optional, "Union": typing.Union}
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = eval(f.type, ns) if isinstance(f.type, str) else f.type  # noqa: S307 (our own source text)
    return out


def check_typed(tp: Any, value: Any, name: str, error: type = ConfigError) -> Any:
    """``value`` checked against the annotation ``tp`` and returned (ints become floats for ``float``,
    tuples lists for ``list[...]``): int (not bool, within int64), float (finite), bool, str, None,
    Optional / ``X | None``, Literal, ``list[X]`` / ``tuple[X, ...]``; Any and other types pass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_typed(option, value, name, error)
            except error as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise error(f"{name} must be {type_name(tp)}, got {_show(value)} ({type(value).__name__})")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise error(f"{name} must be one of {', '.join(repr(a) for a in args)}, got {_show(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"{name} must be a list ({type_name(tp)}), got {_show(value)} ({type(value).__name__})")
        item = args[0] if args else Any
        out = [check_typed(item, v, f"{name}[{i}]", error) for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{name} must be true or false, got {_show(value)} ({type(value).__name__})")
        return value
    if tp is int:
        return check_int(value, name, error=error)
    if tp is float:
        return check_float(value, name, error=error)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{name} must be a string, got {_show(value)} ({type(value).__name__})")
        return value
    if tp is None or tp is type(None):
        if value is not None:
            raise error(f"{name} must be null, got {_show(value)}")
        return value
    return value


def check_options(*specs: tuple) -> None:
    """Command-line numbers (already parsed by type): each ``(name, value, lo, hi[, why])`` must be finite
    and within ``lo..hi`` (None: unbounded on that side; a None value: not given, skipped). A ConfigError
    naming the option (``--frames must be >= 1, got 0``), before any file is read."""
    for name, value, lo, hi, *why in specs:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        if lo is not None and value < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"{name} must be at most {hi}, got {value}{'; ' + why[0] if why else ''}")


#: what the bounds of the common command-line options say, for their messages
WHY_FRAMES = f"vop samples at most {MAX_FRAMES} frames per video"
WHY_IMAGE = f"frames are resized to at most {MAX_IMAGE_SIZE} px"
WHY_BATCH = f"at most {MAX_BATCH} videos per batch"
MAX_WORKERS = 256  # worker processes and CPU threads
MAX_ANN = MAX_BATCH  # top-k results, IVF lists and probes, HNSW search breadth
