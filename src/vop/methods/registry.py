"""One registry of methods: name -> model class, with the facts about each method declared where it
is registered (as timm attaches metadata at registration). Nothing outside a method's own module
needs to know which method is which: the checkpoint code, the optimiser, the demo, the shipped
configs and the service read these facts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from vop.errors import ConfigError, VopError

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
    - ``trains_nothing`` (derived, not declared): the method has no trainable tensor with its default
      options (zero-shot CLIP): a run of it only evaluates.
    """

    label: str
    rates: Rates
    demo_rates: Rates = Rates(3e-3, 1e-5)
    backbone: Backbone = "frozen"
    #: the registered class (set by ``register``), from which derived facts are computed
    model_class: Any = field(default=None, repr=False, compare=False, kw_only=True)

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

    @functools.cached_property
    def trains_nothing(self) -> bool:
        """No tensor of the method is trainable with its default options: a run of it only evaluates (zero-shot
        CLIP; a plugin that trains nothing alike). Derived, once, from the method itself: built with its default
        options on the meta device (no memory, no weights) on the ``tiny`` architecture. A method that cannot be
        built so (a plugin whose defaults need a larger backbone ...) counts as training something: its run
        trains, and reports its own error there."""
        if self.trains_backbone or self.model_class is None:
            return False
        import torch

        from vop.backbone.clip import CLIP
        from vop.backbone.config import get_arch

        try:
            with torch.device("meta"):
                model = self.model_class(CLIP(get_arch("tiny")), frames=2)
        except _NOT_CAUGHT:
            raise
        except BaseException:  # noqa: BLE001 - a plugin's failure is reported where the method is used
            return False
        return not any(p.requires_grad for p in model.parameters())


@dataclass(frozen=True)
class Expected:
    """What vop's shared method tests expect of a method (tests/test_methods.py, tests/test_methods_descriptors.py
    and tests/test_methods_ownership.py iterate ``list_methods()`` and read it), declared at registration
    (``@register(..., expected=Expected(...))``) so that adding a method adds no edit to a shared test file.
    Every method shipped with vop declares it; a plugin may. Counts on ViT-B/32, 12 frames, default options.

    - ``b32``: trainable parameters as the paper counts them; ``b32_uncounted``: trainable ones reported
      separately (the model's ``uncounted``).
    - ``clip_at_init``: its embeddings equal frozen CLIP's (frames mean-pooled) before any training;
      ``text_clip_at_init``: the same of its text embeddings alone, where they differ from the video's
      (None: as ``clip_at_init``; TempMe merges tokens in the image tower from the start, its text tower is
      LoRA's with B = 0: CLIP).
    - ``frame_order``: its video embedding at initialisation depends on the order of the frames.
    - ``mean_pooled``: ``encode_video`` is meanP of ``encode_frames`` (each frame L2-normalised, averaged).
    - ``token_tensors``: last name parts of its token-like tensors that ``no_weight_decay()`` must list,
      beyond those of vop's prompt modules (``tokens``, ``shared``, ``position``, ``deep``,
      ``frame_position``, ``embedding``).
    - ``option_sets``: further options to exercise (counts, gradients, checkpoints, ownership of CLIP's
      tensors): ``(options, trainable parameters on ViT-B/32)`` pairs.
    - ``identity``: options under which the method computes exactly its frozen backbone, bit for bit, on every
      backbone family (zero prompt tokens ...; tests/test_methods_families.py), or a function of the
      architecture (a CLIPConfig) giving them; None: ``{}`` for a method that is ``clip_at_init``, else none.
    """

    b32: int
    b32_uncounted: int = 0
    clip_at_init: bool = True
    text_clip_at_init: bool | None = None
    frame_order: bool = False
    mean_pooled: bool = True
    token_tensors: tuple[str, ...] = ()
    option_sets: tuple[tuple[dict[str, Any], int], ...] = ()
    identity: Any = None

    def identity_options(self, cfg: Any) -> dict[str, Any] | None:
        """The options of :attr:`identity` on a backbone of architecture ``cfg`` (None: the method has none)."""
        if self.identity is None:
            return {} if self.clip_at_init else None
        return self.identity(cfg) if callable(self.identity) else dict(self.identity)


_METHODS: dict[str, type["VideoTextModel"]] = {}
#: third-party methods: packages that declare an entry point in the group ``vop.methods`` (the module
#: that registers them) are imported the first time the registry is listed or asked for an unknown name
PLUGIN_GROUP = "vop.methods"
_plugins: dict[str, str | None] = {}  # entry point -> None (loaded) or the error it raised; filled once
_plugin_methods: dict[str, str] = {}  # method name -> the entry point ("name = value") that registered it
#: what a plugin may not swallow: the user's Ctrl-C and a generator's close
_NOT_CAUGHT = (KeyboardInterrupt, GeneratorExit)


def describe_error(e: BaseException) -> str:
    """One line for an error a plugin raised (``SystemExit`` said as the sys.exit call it was)."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _load_plugins() -> None:
    """Import every plugin once. A plugin that fails to import in any way (an exception, ``sys.exit``,
    a name clash at ``register``) is recorded as broken, with what it registered before failing taken
    back out; the rest of vop and every other method keep working. Only Ctrl-C gets through."""
    if _plugins:
        return
    from importlib.metadata import entry_points

    _plugins["(scanned)"] = None
    failed = []
    for ep in entry_points(group=PLUGIN_GROUP):
        key = f"{ep.name} = {ep.value}"
        before = set(_METHODS)
        try:
            ep.load()
        except _NOT_CAUGHT:
            raise
        except BaseException as e:  # noqa: BLE001 - a broken plugin must not break vop (SystemExit included)
            for name in set(_METHODS) - before:  # all or nothing: no half-registered plugin
                del _METHODS[name]
            _plugins[key] = describe_error(e)
            failed.append(key)
            continue
        _plugins[key] = None
        for name in _METHODS:
            if name not in before:
                _plugin_methods[name] = key
    import warnings

    for key in failed:  # after the scan, so that the registry is whole whatever the warnings filter does
        warnings.warn(f"vop: the method plugin {key} (entry point group {PLUGIN_GROUP!r}) failed to import and is "
                      f"left out: {_plugins[key]}", stacklevel=3)


def broken_plugins() -> dict[str, str]:
    """Plugins that failed to import: entry point (``"name = module"``) -> the error, in one line."""
    _load_plugins()
    return {k: err for k, err in _plugins.items() if err}


def plugin_of(name: str) -> str | None:
    """Where a third-party method comes from: its entry point (``"name = module"``), or the module that
    registered it when imported directly; ``None`` for vop's own methods."""
    if name in _plugin_methods:
        return _plugin_methods[name]
    cls = _METHODS.get(name)
    if cls is None or cls.__module__ == "vop" or cls.__module__.startswith("vop."):
        return None
    return f"module {cls.__module__}"


@contextlib.contextmanager
def plugin_errors(name: str, what: str = "build") -> Iterator[None]:
    """Around a third-party method's own code (its options, its ``__init__``/``build``): whatever it
    raises, other than a ``VopError`` of its own or Ctrl-C, becomes one ``ConfigError`` naming the method
    and its plugin. vop's own methods run unwrapped (a failure there is a bug in vop, shown in full)."""
    plugin = plugin_of(name)
    if plugin is None:
        yield
        return
    try:
        yield
    except (VopError, *_NOT_CAUGHT):
        raise
    except BaseException as e:  # noqa: BLE001 - SystemExit included: a plugin must not end vop
        raise ConfigError(f"method {name!r} (from the plugin {plugin}) failed to {what}: {describe_error(e)}; "
                          "this is a fault of the plugin: fix or uninstall it, or use another method") from e


def register(name: str, *, label: str, rates: Rates, demo_rates: Rates | None = None,
             backbone: Backbone = "frozen", expected: Expected | None = None
             ) -> Callable[[type["VideoTextModel"]], type["VideoTextModel"]]:
    """Class decorator: ``@register("vop-p", label="VoP^P", rates=Rates(5e-3, 1e-6, "..."))``.
    ``expected``: what the shared tests check of it (:class:`Expected`; every method shipped with vop has it)."""
    facts = MethodFacts(label=label, rates=rates, backbone=backbone,
                        **({"demo_rates": demo_rates} if demo_rates is not None else {}))

    def deco(cls: type["VideoTextModel"]) -> type["VideoTextModel"]:
        from vop.methods.base import VideoTextModel

        if name in _METHODS:
            other = _METHODS[name]
            owner = "vop" if plugin_of(name) is None else f"the plugin {plugin_of(name)}"
            raise ValueError(f"method {name!r} is already registered by {owner} ({other.__module__}.{other.__qualname__}); "
                             f"{cls.__module__}.{cls.__qualname__} needs another name")
        if not (isinstance(cls, type) and issubclass(cls, VideoTextModel)):
            raise TypeError(f"@register({name!r}) decorates {cls!r}, which is not a subclass of vop.methods.VideoTextModel")
        if not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
            raise TypeError(f"method {name!r}: {cls.__qualname__}.Options must be a dataclass, got {cls.Options!r}")
        if expected is not None and not isinstance(expected, Expected):
            raise TypeError(f"method {name!r}: expected= must be a vop.methods.Expected, got {expected!r}")
        cls.name = name
        cls.facts = dataclasses.replace(facts, model_class=cls)
        cls.expected = expected  # per registration: a registered subclass does not inherit its parent's
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
        broken = [f"{ep} ({err})" for ep, err in broken_plugins().items()]
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
