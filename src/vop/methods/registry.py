"""One registry of methods: name -> model class. Each method module registers itself."""
from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable

from vop.errors import ConfigError

if TYPE_CHECKING:
    from vop.methods.base import VideoTextModel

_METHODS: dict[str, type["VideoTextModel"]] = {}


def register(name: str) -> Callable[[type["VideoTextModel"]], type["VideoTextModel"]]:
    def deco(cls: type["VideoTextModel"]) -> type["VideoTextModel"]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> type["VideoTextModel"]:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def parse_options(method: str, options_cls: type, options: dict[str, Any]) -> Any:
    """Build a method's options dataclass, rejecting unknown names and wrong types clearly."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    for k, v in options.items():
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(fields) or "none"
            raise ConfigError(f"method {method!r} has no option {k!r}{hint}; its options: {valid}")
        if v is not None and fields[k].type in ("int", "int | None") and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"option {k!r} of method {method!r} must be an integer, got {v!r}")
        if fields[k].type == "bool" and not isinstance(v, bool):
            raise ConfigError(f"option {k!r} of method {method!r} must be true or false, got {v!r}")
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"option {k!r} of method {method!r} must be >= 0, got {v}")
    return options_cls(**options)
