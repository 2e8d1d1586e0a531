"""One registry of methods: name -> model class, with the facts about each method declared where it
is registered (as timm attaches metadata at registration). Nothing outside a method's own module
needs to know which method is which: the checkpoint code, the optimiser, the demo, the shipped
configs and the service read these facts.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from vop.errors import ConfigError

if TYPE_CHECKING:
    from vop.methods.base import VideoTextModel

Backbone = Literal["frozen", "part", "all"]
BACKBONE_TRAINING = ("frozen", "part", "all")


@dataclass(frozen=True)
class Rates:
    """Learning rates: ``lr`` for the method's new tensors (prompts, adapters, modules), ``backbone_lr``
    for CLIP's own tensors it unfreezes; ``why``: where they come from (quoted in the shipped configs)."""

    lr: float
    backbone_lr: float
    why: str = ""


@dataclass(frozen=True)
class MethodFacts:
    """What the rest of vop needs to know about a method.

    - ``label``: its name in the paper's tables (``VoP^{F+P}``).
    - ``backbone``: what it trains of CLIP. ``"frozen"``: nothing (its checkpoint holds only the new
      tensors and needs the backbone it was trained on); ``"part"``: some CLIP tensors (stored in the
      checkpoint, loaded over a copy of the backbone); ``"all"``: every CLIP weight (the checkpoint is
      the whole model and loads without a backbone).
    - ``rates``: learning rates for real data (the shipped configs; starting points, see their ``why``).
    - ``demo_rates``: learning rates on the synthetic world (chosen on its validation split).
    """

    label: str
    rates: Rates
    demo_rates: Rates = Rates(3e-3, 1e-5)
    backbone: Backbone = "frozen"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_TRAINING:
            raise ValueError(f"backbone must be one of {BACKBONE_TRAINING}, got {self.backbone!r}")

    @property
    def trains_backbone(self) -> bool:
        return self.backbone != "frozen"

    @property
    def whole_model(self) -> bool:
        """Its checkpoints hold every weight (no backbone needed to load them)."""
        return self.backbone == "all"


_METHODS: dict[str, type["VideoTextModel"]] = {}
#: third-party methods: packages that declare an entry point in the group ``vop.methods`` (the module
#: that registers them) are imported the first time the registry is listed or asked for an unknown name
PLUGIN_GROUP = "vop.methods"
_plugins: dict[str, str | None] = {}  # entry point -> None (loaded) or the error it raised; filled once


def _load_plugins() -> None:
    if _plugins:
        return
    from importlib.metadata import entry_points

    _plugins["(scanned)"] = None
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
            _plugins[f"{ep.name} = {ep.value}"] = None
        except Exception as e:  # a broken plugin must not break vop; asking for its method says why
            import warnings

            _plugins[f"{ep.name} = {ep.value}"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"vop: the method plugin {ep.name} = {ep.value} (entry point group {PLUGIN_GROUP!r}) "
                          f"failed to import: {type(e).__name__}: {e}", stacklevel=2)


def register(name: str, *, label: str, rates: Rates, demo_rates: Rates | None = None,
             backbone: Backbone = "frozen") -> Callable[[type["VideoTextModel"]], type["VideoTextModel"]]:
    """Class decorator: ``@register("vop-p", label="VoP^P", rates=Rates(5e-3, 1e-6, "..."))``."""
    facts = MethodFacts(label=label, rates=rates, backbone=backbone,
                        **({"demo_rates": demo_rates} if demo_rates is not None else {}))

    def deco(cls: type["VideoTextModel"]) -> type["VideoTextModel"]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        cls.facts = facts
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    _load_plugins()
    return list(_METHODS)


def get_method(name: str) -> type["VideoTextModel"]:
    if name not in _METHODS:
        _load_plugins()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        broken = [f"{ep} ({err})" for ep, err in _plugins.items() if err]
        hint += f"; method plugins that failed to import: {'; '.join(broken)}" if broken else ""
        raise ConfigError(f"unknown method {name!r}{hint}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_facts(name: str) -> MethodFacts:
    """The declared facts of a registered method (``ConfigError`` for an unknown name)."""
    return get_method(name).facts


def check_option_types(method: str, opts: Any) -> None:
    """Every field of an options dataclass checked against its annotation (vop.limits.check_typed: int within
    int64 and >= 0 at the top level, finite float, bool, str, ``list[int]``, Optional, Literal); the value is
    normalised in place (an int given for a float becomes a float, a tuple for a list a list). A ConfigError
    naming the option and the method."""
    from vop.limits import check_typed, is_int, resolve_hints

    if not dataclasses.is_dataclass(opts) or isinstance(opts, type):
        raise ConfigError(f"options of method {method!r} must be its options dataclass, got {type(opts).__name__}")
    hints = resolve_hints(type(opts))
    for f in dataclasses.fields(opts):
        name = f"{method} option {f.name}"
        value = check_typed(hints.get(f.name, Any), getattr(opts, f.name), name)
        if is_int(value) and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
        object.__setattr__(opts, f.name, value)


def parse_options(method: str, options_cls: type, options: dict[str, Any]) -> Any:
    """Build a method's options dataclass, rejecting unknown names and wrong types clearly (its ranges,
    which depend on the backbone, are the method's ``check_options``, run when the model is built)."""
    if not isinstance(options, dict):
        raise ConfigError(f"the options of method {method!r} must be a mapping of names to values, got "
                          f"{type(options).__name__}")
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    for k in options:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(fields) or "none"
            raise ConfigError(f"method {method!r} has no option {k!r}{hint}; its options: {valid}")
    try:
        opts = options_cls(**options)
    except (TypeError, ValueError) as e:  # an options class's own __post_init__
        raise ConfigError(f"options of method {method!r}: {e}") from None
    check_option_types(method, opts)
    return opts
