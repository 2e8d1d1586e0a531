"""CLIP architectures as data: dataclasses plus a registry filled from `archs/*.json`.

Names follow open_clip (``ViT-B-32``), any case. OpenAI's slash names (``ViT-B/32``, ``ViT-B/16``,
``ViT-L/14``, ``ViT-L/14@336px``) mean OpenAI's released models, i.e. open_clip's ``-quickgelu`` configs. The registry holds
every open_clip ViT config our towers express, with open_clip's values and activation (its names
without ``-quickgelu`` use GELU); docs/methods.md ("Backbones") lists the ones refused and why.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from vop import limits
from vop.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from vop.formats import ArchRecord

Act = Literal["quick_gelu", "gelu"]
ACTS = ("quick_gelu", "gelu")
#: a tower may name its own activation, also the tanh approximation of GELU (SigLIP2's text tower)
TOWER_ACTS = ("quick_gelu", "gelu", "gelu_tanh")
#: the families of towers vop builds (what the tensors and the records hold: docs/methods.md, Backbones)
FAMILIES = ("clip", "pe-core", "eva02", "siglip")
#: how an image is brought to the tower's square input: shortest side + centre crop (CLIP), or squashed
RESIZES = ("crop", "squash")
#: how a text tower's tokenizer is made: CLIP's BPE (shipped), or read from a file the user gives (SigLIP2's
#: Gemma SentencePiece vocabulary: pad 0, EOS 1; SigLIP's T5 c4-en vocabulary: pad = EOS = 1)
TOKENIZERS = ("clip", "gemma", "t5")
INTERPOLATIONS = ("bicubic", "bilinear")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """How frames become a tower's input (the architecture record's ``vision.mean/std/resize/interpolation``):
    ``resize`` "crop" (shortest side to ``size``, centre crop) or "squash" (both sides to ``size``), with
    ``interpolation``; then (x / 255 - mean) / std per channel."""
    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "crop"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _check_preprocess(self, "preprocess")

    @property
    def is_clip(self) -> bool:
        """CLIP's own pipeline (bicubic, shortest side + centre crop, OpenAI mean/std)."""
        return (self.mean, self.std, self.resize, self.interpolation) == (CLIP_MEAN, CLIP_STD, "crop", "bicubic")

    def with_size(self, size: int) -> "Preprocess":
        return dataclasses.replace(self, size=size)

    def tag(self) -> str:
        """A short name of the geometry for file names (frame caches): "" for CLIP's."""
        return "" if (self.resize, self.interpolation) == ("crop", "bicubic") else f"_{self.resize}-{self.interpolation}"


def _check_choice(value: Any, name: str, choices: tuple) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _triple(obj: Any, attr: str, name: str) -> None:
    """A per-channel triple of finite numbers (a JSON list becomes a tuple); std > 0."""
    value = getattr(obj, attr)
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{name}.{attr} must be three numbers (one per channel), got {value!r}")
    vals = tuple(limits.check_float(v, f"{name}.{attr}", 0, 1e3, lo_open=attr == "std") for v in value)
    object.__setattr__(obj, attr, vals)


def _check_preprocess(p: Any, name: str) -> None:
    if hasattr(p, "size"):
        limits.check_int(p.size, f"{name}.size", 1, limits.MAX_IMAGE_SIZE)
    _triple(p, "mean", name)
    _triple(p, "std", name)
    _check_choice(p.resize, f"{name}.resize", RESIZES)
    _check_choice(p.interpolation, f"{name}.interpolation", INTERPOLATIONS)


def _check_tower(c: "VisionConfig | TextConfig", tower: str) -> None:
    """Types and bounds of a tower's sizes (vop.limits), before any module is built: a ConfigError naming
    the field (``vision.width`` ...)."""
    n = lambda f: f"architecture {tower}.{f}"  # noqa: E731
    limits.check_int(c.width, n("width"), 1, limits.MAX_WIDTH)
    limits.check_int(c.layers, n("layers"), 1, limits.MAX_LAYERS)
    limits.check_int(c.heads, n("heads"), 1, c.width)
    if c.width % c.heads:
        raise ConfigError(f"{n('width')} {c.width} is not divisible by {tower}.heads {c.heads} (the attention heads "
                          "split the width evenly)")
    limits.check_float(c.mlp_ratio, n("mlp_ratio"), 0, None, lo_open=True)
    if not 1 <= c.mlp_width <= limits.MAX_MLP_WIDTH:
        raise ConfigError(f"{n('mlp_ratio')} {c.mlp_ratio!r} gives an MLP width of {c.mlp_width} for width {c.width}, "
                          f"outside 1..{limits.MAX_MLP_WIDTH}")


def _check_eps(c: Any, tower: str) -> None:
    limits.check_float(c.eps, f"architecture {tower}.eps", 0, 0.1, lo_open=True)
    if c.act is not None:
        _check_choice(c.act, f"architecture {tower}.act", TOWER_ACTS)
    _check_bool(c.proj_bias, f"architecture {tower}.proj_bias")


@dataclass(frozen=True)
class VisionConfig:
    """The image tower. The first six fields are what every architecture has (OpenAI's CLIP ViT); the others
    describe the other families' towers (their defaults are OpenAI's CLIP, and a record leaves them out):

    - ``act``: the MLP activation (None: the architecture's ``act``); ``eps``: every LayerNorm's epsilon;
    - ``class_token`` ([CLS] first, with its own position row), ``ln_pre`` (LayerNorm before the blocks),
      ``patch_bias`` (a bias on the patch embedding);
    - ``qkv_bias``: "qkv" (one fused bias) or "qv" (EVA02: no key bias); ``attn_norm``: a LayerNorm over the
      heads' outputs before the output projection (EVA02's sub-LN); ``mlp``: "mlp" (fc -> act -> fc) or
      "swiglu" (SiLU(gate) * x, then ``mlp_norm``'s LayerNorm if set, then fc);
    - ``rope``: 2-D rotary position embedding on the patches' queries and keys (never on [CLS] or prompts):
      ``head_dim / 4`` frequencies ``rope_theta ** (-k / (head_dim / 4))`` per axis, patch (row r, column c) at
      coordinates ((r or c) + ``rope_offset``) * ``rope_ref_grid`` / grid (no rescaling when None), x first for
      ``rope_indexing`` "xy" (PE), y first for "ij" (EVA02); interleaved pairs (vop.backbone.layers.Rope);
    - ``pool``: the read-out, "token" ([CLS] after ln_post) or "map" (an attention pool with one latent query,
      ``pool_heads`` heads (None: the tower's) and an MLP of ``pool_mlp_ratio`` (None: the tower's MLP width;
      its activation is the tower's), over the final tokens after ln_post); ``proj``: a projection to the joint
      space (SigLIP has none: the read-out is the embedding, ``embed_dim`` = ``width``); ``proj_bias``: a bias
      on it;
    - ``mean``, ``std``, ``resize``, ``interpolation``: the preprocessing the tower was trained with
      (:class:`Preprocess`).
    """
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str | None = None
    eps: float = 1e-5
    class_token: bool = True
    ln_pre: bool = True
    patch_bias: bool = False
    qkv_bias: str = "qkv"
    attn_norm: bool = False
    mlp: str = "mlp"
    mlp_norm: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    rope_offset: float = 0.0
    rope_indexing: str = "ij"
    rope_ref_grid: int | None = None
    pool: str = "token"
    pool_heads: int | None = None
    pool_mlp_ratio: float | None = 4.0
    proj: bool = True
    proj_bias: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "crop"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _check_tower(self, "vision")
        limits.check_int(self.image_size, "architecture vision.image_size", 1, limits.MAX_IMAGE_SIZE)
        limits.check_int(self.patch_size, "architecture vision.patch_size", 1, self.image_size)
        if self.image_size % self.patch_size:
            raise ConfigError(f"architecture vision.image_size {self.image_size} is not a multiple of vision.patch_size "
                              f"{self.patch_size}")
        n = lambda f: f"architecture vision.{f}"  # noqa: E731
        _check_eps(self, "vision")
        for f in ("class_token", "ln_pre", "patch_bias", "attn_norm", "mlp_norm", "rope", "proj"):
            _check_bool(getattr(self, f), n(f))
        _check_choice(self.qkv_bias, n("qkv_bias"), ("qkv", "qv"))
        _check_choice(self.mlp, n("mlp"), ("mlp", "swiglu"))
        _check_choice(self.pool, n("pool"), ("token", "map"))
        if self.pool == "token" and not self.class_token:
            raise ConfigError("architecture vision.pool 'token' reads the [CLS] token: it needs vision.class_token")
        if self.rope:
            limits.check_float(self.rope_theta, n("rope_theta"), 1, 1e9)
            limits.check_float(self.rope_offset, n("rope_offset"), 0, limits.MAX_IMAGE_SIZE)
            _check_choice(self.rope_indexing, n("rope_indexing"), ("xy", "ij"))
            if self.rope_ref_grid is not None:
                limits.check_int(self.rope_ref_grid, n("rope_ref_grid"), 1, limits.MAX_IMAGE_SIZE)
            if self.head_dim % 4:
                raise ConfigError(f"architecture vision.rope needs a head width divisible by 4 (two axes of pairs), got "
                                  f"{self.head_dim}")
        if self.pool == "map":
            if self.pool_heads is not None:
                limits.check_int(self.pool_heads, n("pool_heads"), 1, self.width)
                if self.width % self.pool_heads:
                    raise ConfigError(f"{n('width')} {self.width} is not divisible by vision.pool_heads {self.pool_heads}")
            if self.pool_mlp_ratio is not None:
                limits.check_float(self.pool_mlp_ratio, n("pool_mlp_ratio"), 0, None, lo_open=True)
            if not 1 <= self.pool_mlp_width <= limits.MAX_MLP_WIDTH:
                raise ConfigError(f"{n('pool_mlp_ratio')} {self.pool_mlp_ratio!r} gives an MLP width of "
                                  f"{self.pool_mlp_width}, outside 1..{limits.MAX_MLP_WIDTH}")
        if not self.proj and self.proj_bias:
            raise ConfigError("architecture vision.proj_bias is a bias on the projection: it needs vision.proj")
        _check_preprocess(self, "architecture vision")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches in the frozen sequence: 1 ([CLS]) or 0."""
        return int(self.class_token)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return int(round(self.width * self.mlp_ratio))

    @property
    def pool_mlp_width(self) -> int:
        if self.pool_mlp_ratio is None:  # the tower's own MLP width (SigLIP: timm passes the tower's mlp_ratio)
            return self.mlp_width
        return int(self.width * self.pool_mlp_ratio)  # timm's AttentionPoolLatent: int(), not round()

    @property
    def attn_pool_heads(self) -> int:
        return self.heads if self.pool_heads is None else self.pool_heads

    @property
    def preprocess(self) -> Preprocess:
        """How frames become this tower's input, at its native size."""
        return Preprocess(self.image_size, self.mean, self.std, self.resize, self.interpolation)


@dataclass(frozen=True)
class TextConfig:
    """The text tower. Beyond the sizes: ``act`` (None: the architecture's), ``eps`` (LayerNorm epsilon),
    ``causal`` (the causal mask), ``pool`` (read the final tokens at "argmax": the largest id, CLIP's [EOT]; or
    at the "last" position: SigLIP, whose sequences always fill the context), ``proj_bias`` and ``tokenizer``
    ("clip": CLIP's BPE; "gemma" / "t5": a SentencePiece vocabulary read from a file the user gives, SigLIP2's /
    SigLIP's, vop.backbone.tokenizer.FileTokenizer)."""
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str | None = None
    eps: float = 1e-5
    causal: bool = True
    pool: str = "argmax"
    proj_bias: bool = False
    tokenizer: str = "clip"

    def __post_init__(self) -> None:
        _check_tower(self, "text")
        limits.check_int(self.context_length, "architecture text.context_length", limits.MIN_CAPTION, limits.MAX_CONTEXT)
        limits.check_int(self.vocab_size, "architecture text.vocab_size", 1, limits.MAX_VOCAB)
        _check_eps(self, "text")
        _check_bool(self.causal, "architecture text.causal")
        _check_choice(self.pool, "architecture text.pool", ("argmax", "last"))
        _check_choice(self.tokenizer, "architecture text.tokenizer", TOKENIZERS)

    @property
    def mlp_width(self) -> int:
        return int(round(self.width * self.mlp_ratio))


#: the fields of OpenAI's CLIP configs; the others are written to records only where they differ from
#: their default, so the records (and ``key()``, the weights fingerprint) of CLIP architectures are unchanged
_BASE_FIELDS = {"": ("embed_dim", "vision", "text", "act"),
                "vision": ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"),
                "text": ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}


def _record(obj: Any, where: str) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("vision", "text"):
            value = _record(value, f.name)
        elif f.name not in _BASE_FIELDS[where]:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if value == default:
                continue
            value = list(value) if isinstance(value, tuple) else value
        out[f.name] = value
    return out


@dataclass(frozen=True)
class CLIPConfig:
    """A dual encoder: ``family`` ("clip": OpenAI's CLIP; "pe-core": Meta's Perception Encoder; "eva02":
    EVA02-CLIP; "siglip": Google's SigLIP / SigLIP2), the towers, ``act`` (the towers' activation unless one names its own) and ``logit_bias``
    (a learned bias added to the scaled scores, SigLIP's)."""
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    act: Act = "quick_gelu"
    family: str = "clip"
    logit_bias: bool = False

    def __post_init__(self) -> None:
        """Every size checked (types, ranges, heads dividing widths: vop.limits) when the config is made,
        so no CLIP is ever built, not even on the meta device, from an absurd one: a ConfigError."""
        limits.check_int(self.embed_dim, "architecture embed_dim", 1, limits.MAX_WIDTH)
        for name, kind in (("vision", VisionConfig), ("text", TextConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"architecture {name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.act not in ACTS:
            raise ConfigError(f"architecture act must be one of {', '.join(ACTS)}, got {self.act!r}")
        _check_choice(self.family, "architecture family", FAMILIES)
        _check_bool(self.logit_bias, "architecture logit_bias")
        if not self.vision.proj and self.embed_dim != self.vision.width:
            raise ConfigError(f"architecture embed_dim {self.embed_dim} must be the image tower's width "
                              f"{self.vision.width}: without vision.proj the read-out is the embedding")

    @property
    def vision_act(self) -> str:
        """The image tower's MLP activation (a SwiGLU tower's gate is SiLU whatever this says)."""
        return self.vision.act or self.act

    @property
    def text_act(self) -> str:
        return self.text.act or self.act

    def to_dict(self) -> dict[str, Any]:
        """The record: OpenAI's CLIP fields always, the other families' fields where they differ from the default."""
        return _record(self, "")

    @classmethod
    def from_dict(cls, d: Any) -> "CLIPConfig":
        """From :meth:`to_dict`'s layout; a ConfigError for anything else (not a mapping, unknown or
        missing-typed keys, out-of-range sizes), never a TypeError."""
        def fields_of(kind: type, value: Any, where: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise ConfigError(f"architecture{' ' + where if where else ''} must be a mapping of sizes, got "
                                  f"{type(value).__name__}")
            names = [f.name for f in dataclasses.fields(kind)]
            unknown = sorted(map(str, set(value) - set(names)))
            if unknown:
                raise ConfigError(f"architecture{' ' + where if where else ''} has unknown key(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(names)}")
            return dict(value)

        d = fields_of(cls, d, "")
        vision = VisionConfig(**fields_of(VisionConfig, d.pop("vision", {}), "vision"))
        text = TextConfig(**fields_of(TextConfig, d.pop("text", {}), "text"))
        return cls(vision=vision, text=text, **d)

    def key(self) -> str:
        """A canonical string of the architecture, used to check that checkpoints fit."""
        return json.dumps(self.to_dict(), sort_keys=True)


#: OpenAI's own names (``clip.load("ViT-B/32")``) mean OpenAI's released models, which use QuickGELU:
#: open_clip calls them ``ViT-B-32-quickgelu`` ...; open_clip's dash names keep open_clip's meaning (GELU).
_OPENAI_NAMES = {"vit-b/32": "vit-b-32-quickgelu", "vit-b/16": "vit-b-16-quickgelu", "vit-l/14": "vit-l-14-quickgelu",
                 "vit-l/14@336px": "vit-l-14-336-quickgelu", "vit-l/14-336": "vit-l-14-336-quickgelu"}


def _canonical(name: str) -> str:
    name = name.strip().lower()
    return _OPENAI_NAMES.get(name, name.replace("/", "-"))


def _load_registry() -> dict[str, CLIPConfig]:
    out: dict[str, CLIPConfig] = {}
    for entry in sorted(resources.files("vop.backbone").joinpath("archs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = CLIPConfig.from_dict(json.loads(entry.read_text()))
    return out


_REGISTRY = _load_registry()

#: open_clip configs our towers cannot express (checked on the canonical name, in order): what they need
_REFUSED = (
    (r"worldwide", "a multilingual tokenizer (xlm-v-base or mt5-base, not CLIP's BPE) and text pooling at its "
                   "EOS id (pool_type='eos')"),
    (r"naflex", "a variable-resolution (NaFlex) image tower (Siglip2Model: a linear patch embedding over "
                "variable grids); vop builds the fixed-resolution SigLIP2 towers (ViT-B-16-SigLIP2 ...)"),
    (r"^nllb-clip", "a Hugging Face NLLB text tower"),
    (r"siglip-i18n", "a multilingual SigLIP text tower (mc4 vocabulary; the SO400M one has no text projection), not "
                     "shipped in v1; the English SigLIP / SigLIP2 configs are (ViT-B-16-SigLIP2 ...)"),
    (r"^vit-so400m-14-siglip-384$", "a 384 px input the 14 px patches do not divide (timm drops the last 6 pixel rows "
                                    "and columns); use ViT-SO400M-14-SigLIP-378, the same weights at 378 px"),
    (r"clipa", "no LayerNorm before the image transformer (no_ln_pre), average pooling then LayerNorm "
               "(pool_type='avg', final_ln_after_pool) and a BERT-tokenizer text tower without causal mask"),
    (r"^vit-m-16-alt$", "layer scale in the image tower (ls_init_value)"),
    (r"^coca", "CoCa's attentional pooler and text decoder"),
    (r"roberta|mt5|nllb|bert|moderntext|gte-", "a Hugging Face or modern text tower"),
    (r"^(clap|naflex)", "audio or variable-resolution (NaFlex) towers"),
    (r"^rn\d", "a ResNet image tower"),
    (r"^pe-core-bigg", "PE-Core-bigG's image tower without a class token, with its own RoPE grid and attention-pool "
                       "sizes (2.4B parameters, 448 px), not shipped yet (the class-less path itself runs SigLIP)"),
    (r"^eva02-e-14", "post-norm blocks (timm's EvaBlockPostNorm)"),
    (r"^eva01", "EVA01's image tower (no RoPE, no SwiGLU; EVA-CLIP's first generation)"),
    (r"^(convnext|swin|vit_|vitamin|eva|mobileclip|pe-core)", "a timm or other non-CLIP image tower"),
)

#: tensors of towers we do not have: key prefix -> the feature
_FOREIGN_TENSORS = (
    ("visual.trunk.", "a timm image tower (visual.trunk.*; open_clip's SigLIP and timm configs)"),
    ("visual.layer1.", "a ResNet image tower (visual.layer1.*; open_clip's RN50 ... configs)"),
    ("visual.attn_pool.query", "an attentional pooler with many queries (visual.attn_pool.query; CoCa)"),
    ("text.", "a Hugging Face or custom text tower (text.*)"),
    ("text_projection.weight", "a text projection with a bias (proj_bias; the SigLIP configs)"),
)
CLIP_VOCAB = 49408


def list_archs() -> list[str]:
    return sorted(_REGISTRY)


def is_arch(name: str) -> bool:
    return any(_canonical(k) == _canonical(name) for k in _REGISTRY)


def refused_reason(name: str) -> str | None:
    """For an open_clip config name our towers cannot express: what it needs that they lack."""
    for pattern, reason in _REFUSED:
        if re.search(pattern, _canonical(name)):
            return reason
    return None


def get_arch(name: str) -> CLIPConfig:
    for k, v in _REGISTRY.items():
        if _canonical(k) == _canonical(name):
            return v
    reason = refused_reason(name)
    if reason is not None:
        raise CheckpointError(
            f"{name!r} is an open_clip architecture vop does not support: it needs {reason}, which vop's "
            "OpenAI-style CLIP towers do not have (docs/methods.md, Backbones, lists what is covered)"
        )
    raise CheckpointError(
        f"unknown architecture {name!r}; known: {', '.join(list_archs())} "
        "(or give a path to a weights file)"
    )


def arch_name(cfg: CLIPConfig) -> str | None:
    """The registry name of a config, if it is one of the registered architectures."""
    for k, v in _REGISTRY.items():
        if v == cfg:
            return k
    return None


def shapes(cfg: CLIPConfig) -> tuple:
    """All an architecture's tensors show: everything but the head counts, the activations, the epsilons, the
    RoPE layout, the read-out's heads, the text mask and pooling, and the preprocessing."""
    v, t = cfg.vision, cfg.text
    base = (cfg.embed_dim, v.image_size, v.patch_size, v.width, v.layers, v.mlp_width,
            t.context_length, t.vocab_size, t.width, t.layers, t.mlp_width)
    return base + (v.class_token, v.ln_pre, v.patch_bias, v.qkv_bias, v.attn_norm, v.mlp, v.mlp_norm, v.pool,
                   v.pool_mlp_width if v.pool == "map" else 0, v.proj, v.proj_bias, t.proj_bias, cfg.logit_bias)


def parameter_count(cfg: CLIPConfig) -> int:
    """The number of parameters of ``CLIP(cfg)``, from the sizes alone (no module is built; equal to
    ``sum(p.numel() for p in CLIP(cfg).parameters())``, tests/test_bounds.py checks it)."""
    def tower(c: VisionConfig | TextConfig) -> int:
        w, m = c.width, c.mlp_width
        if isinstance(c, VisionConfig):
            attn = 3 * w * w + (2 if c.qkv_bias == "qv" else 3) * w + (2 * w if c.attn_norm else 0) + w * w + w
            mlp = ((2 if c.mlp == "swiglu" else 1) * (w * m + m) + (2 * m if c.mlp_norm else 0) + m * w + w)
        else:
            attn, mlp = (3 * w * w + 3 * w) + (w * w + w), (w * m + m) + (m * w + w)
        return c.layers * (attn + mlp + 4 * w) + 2 * w  # + ln_1, ln_2 per block; + the final LayerNorm
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    w = v.width
    vision = (3 * v.patch_size**2 * w + (w if v.patch_bias else 0) + (w if v.class_token else 0)
              + (v.num_patches + v.num_prefix) * w + (2 * w if v.ln_pre else 0) + tower(v)
              + (w * e if v.proj else 0) + (e if v.proj_bias else 0))
    if v.pool == "map":  # latent, q/k/v (fused), out-proj, LayerNorm, MLP
        pm = v.pool_mlp_width
        vision += w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * pm + pm) + (pm * w + w)
    text = t.vocab_size * t.width + t.context_length * t.width + tower(t) + t.width * e + (e if t.proj_bias else 0)
    return vision + text + 1 + int(cfg.logit_bias)  # + the logit scale (and bias)


def same_tensors(a: CLIPConfig, b: CLIPConfig) -> bool:
    """Whether weights of ``a`` load into ``b`` and compute the same (up to the activation)."""
    return shapes(a) == shapes(b) and (a.vision.heads, a.text.heads) == (b.vision.heads, b.text.heads)


def family_of(sd: dict[str, Any]) -> str:
    """The family of tower a state dict with canonical names holds, from its key patterns: "pe-core" (an
    attention-pool read-out, visual.attn_pool.probe, with [CLS]), "siglip" (an attention pool without [CLS], a
    logit bias and a text projection with a bias), "eva02" (split q/v biases, visual...attn.q_bias),
    "class-less" (an attention pool without [CLS] that is not SigLIP's: PE-Core-bigG), else "clip"."""
    if "visual.attn_pool.probe" in sd:
        if "visual.class_embedding" in sd:
            return "pe-core"
        return "siglip" if "logit_bias" in sd and "text_projection_bias" in sd else "class-less"
    if any(k.startswith("visual.") and k.endswith(".attn.q_bias") for k in sd):
        return "eva02"
    return "clip"


_CLASS_LESS = ("an image tower without a class token read out by an attention pool, without SigLIP's logit bias "
               "and biased text projection (PE-Core-bigG-14-448, not shipped yet; docs/methods.md, Backbones)")


def unsupported_feature(sd: dict[str, Any]) -> str | None:
    """A feature of a state dict with canonical names that vop's towers lack (layer scale, timm towers ...)."""
    for k in sd:
        if ".ls_1." in k or ".ls_2." in k or ".gamma_1" in k or ".gamma_2" in k:
            return f"layer scale ({k}; open_clip's ls_init_value, e.g. ViT-M-16-alt)"
    for prefix, feature in _FOREIGN_TENSORS:
        if any(k.startswith(prefix) for k in sd):
            return feature
    family = family_of(sd)
    if family == "class-less":
        return _CLASS_LESS
    if family == "clip" and "visual.conv1.weight" in sd and "visual.ln_pre.weight" not in sd:
        return "no LayerNorm before the image transformer (no_ln_pre; the CLIPA configs)"
    emb = sd.get("token_embedding.weight")
    if family == "clip" and emb is not None and emb.shape[0] != CLIP_VOCAB:
        return (f"a {emb.shape[0]}-token text vocabulary, not CLIP's BPE ({CLIP_VOCAB}), the only tokenizer vop has "
                "(e.g. open_clip's -worldwide configs: a multilingual tokenizer pooled at its EOS id)")
    return None


def check_supported(sd: dict[str, Any]) -> None:
    feature = unsupported_feature(sd)
    if feature is not None:
        raise CheckpointError(f"the weights use {feature}, which vop's CLIP towers do not have")


_NAME_IT = ("name the architecture: load_clip(..., arch='ViT-H-14'), model.backbone_arch in a run config or "
            "vop eval --backbone-arch; or give the head counts: load_clip(..., heads=(vision_heads, text_heads))")


def _tower_heads(kind: str, width: int, layers: int, mlp_width: int) -> int:
    """Heads of a tower from the shipped towers of the same sizes, else width // 64 where that is safe."""
    towers = [getattr(c, kind) for c in _REGISTRY.values() if c.family == "clip"]
    same = {t.heads for t in towers if (t.width, t.layers, t.mlp_width) == (width, layers, mlp_width)}
    if len(same) == 1:
        return same.pop()
    name = "image" if kind == "vision" else "text"
    if same:
        raise CheckpointError(f"the {width}-wide {layers}-layer {name} tower matches shipped towers with "
                              f"{' or '.join(map(str, sorted(same)))} heads: the tensors cannot tell which; {_NAME_IT}")
    other = sorted({f"{t.heads} heads of {t.width // t.heads}" for t in towers if t.width == width and t.heads * 64 != width})
    if width % 64 or other:
        why = f"a {width}-wide shipped {name} tower has {', '.join(other)}" if other else f"{width} is not a multiple of 64"
        raise CheckpointError(
            f"the attention head count of the {width}-wide {layers}-layer {name} tower cannot be read from the "
            f"tensors: it matches no shipped architecture, and width // 64 is not safe ({why}); {_NAME_IT}"
        )
    return width // 64


def check_heads(heads: Any) -> tuple[int, int]:
    """``heads=(vision_heads, text_heads)`` as given to load_clip: two integers >= 1 (whether they divide the
    widths is checked with the rest of the architecture); a CheckpointError naming ``heads=`` otherwise."""
    if not (isinstance(heads, (tuple, list)) and len(heads) == 2):
        raise CheckpointError(f"heads= must be (vision_heads, text_heads), two integers >= 1, got {heads!r}")
    for h, tower in zip(heads, ("vision", "text")):
        limits.check_int(h, f"heads=: the {tower} head count", 1, limits.MAX_WIDTH, error=CheckpointError)
    return int(heads[0]), int(heads[1])


def infer_config(sd: dict[str, Any], act: Act | None = None, heads: tuple[int, int] | None = None) -> CLIPConfig:
    """Infer the architecture from an OpenAI/open_clip-named state dict (as OpenAI's build_model does).

    The tensors give every size but the head counts and the activation. Heads: ``heads=(vision_heads,
    text_heads)`` if given; else those of the shipped towers of the same width, depth and MLP width;
    else width // 64 (open_clip's default head width) where no shipped tower of that width has other
    heads; else a CheckpointError asks for ``arch=`` or ``heads=``. Activation: ``act`` if given; GELU
    if every shipped architecture with these exact shapes is a GELU one (open_clip's ViT-H-16,
    ViT-g-14 ...); QuickGELU for the shapes of OpenAI's released models (ViT-B/32, B/16, L/14,
    L/14@336px; LAION's weights of those shapes need ``act="gelu"`` or ``arch=``) and for unknown
    architectures; a CheckpointError where shipped GELU and QuickGELU configs share the shapes
    (ViT-H-14, ViT-bigG-14 ...: LAION vs DFN/MetaCLIP weights).
    """
    check_supported(sd)
    family = family_of(sd)
    if family != "clip":
        return infer_family(sd, family, act=act, heads=heads)
    try:
        conv = sd["visual.conv1.weight"]
        vwidth, patch = conv.shape[0], conv.shape[-1]
        vlayers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        grid = round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
        vhidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = sd["text_projection"].shape[1]
        context = sd["positional_embedding"].shape[0]
        vocab = sd["token_embedding.weight"].shape[0]
        twidth = sd["ln_final.weight"].shape[0]
        tlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        thidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a CLIP ViT state dict: missing key {e.args[0]!r}") from None
    except (IndexError, ValueError) as e:  # a tensor of the wrong rank (a 1-d conv1 ...)
        raise CheckpointError(f"not a CLIP ViT state dict: a tensor has an unexpected shape ({e})") from None
    given = heads is not None
    if heads is None:
        heads = (_tower_heads("vision", vwidth, vlayers, vhidden), _tower_heads("text", twidth, tlayers, thidden))
    else:
        heads = check_heads(heads)
    try:
        if not (vwidth and twidth):
            raise ConfigError(f"a tower of width 0 (image {vwidth}, text {twidth})")
        cfg = CLIPConfig(
            embed_dim=embed_dim,
            vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=vwidth, layers=vlayers, heads=heads[0],
                                mlp_ratio=vhidden / vwidth),
            text=TextConfig(context_length=context, vocab_size=vocab, width=twidth, heads=heads[1], layers=tlayers,
                            mlp_ratio=thidden / twidth),
        )
    except ConfigError as e:
        if given and "heads" in str(e):
            raise CheckpointError(f"heads={tuple(heads)} do not fit these tensors: {e}") from None
        raise CheckpointError(f"the tensors describe an architecture vop cannot build: {e}") from None
    known = [c for c in _REGISTRY.values() if same_tensors(c, cfg)]
    if act is None:
        acts = {c.act for c in known}
        if acts == {"gelu"}:
            act = "gelu"
        elif len(acts) > 1 and not any(same_tensors(get_arch(n), cfg) for n in _OPENAI_NAMES):
            # e.g. ViT-H-14: LAION's weights use GELU, DFN's and MetaCLIP's QuickGELU; the tensors cannot tell
            names = sorted(k for k, c in _REGISTRY.items() if same_tensors(c, cfg))
            raise CheckpointError(
                f"these weights fit {' and '.join(names)}, which differ only in the activation (GELU or QuickGELU), "
                f"and the tensors cannot tell which: name it (load_clip(..., arch={names[0]!r}), model.backbone_arch in a run "
                "config or vop eval --backbone-arch), or pass act='gelu' / "
                "act='quick_gelu' (LAION's open_clip weights use GELU; OpenAI's, DFN's and MetaCLIP's QuickGELU)")
        else:  # OpenAI's released shapes (its files use QuickGELU) or an unknown architecture
            act = "quick_gelu"
    return dataclasses.replace(known[0] if known else cfg, act=act)


def family_shapes(sd: dict[str, Any]) -> dict[str, Any]:
    """The sizes the tensors of a PE-Core / EVA02 / SigLIP state dict (canonical names) show, as :func:`shapes`
    names them; a CheckpointError naming the missing key otherwise."""
    try:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        prefix = int("visual.class_embedding" in sd)
        grid = round(math.sqrt(sd["visual.positional_embedding"].shape[0] - prefix))
        hidden = sd["visual.transformer.resblocks.0.mlp.c_proj.weight"].shape[1]
        return {
            "embed_dim": (sd["visual.proj"] if "visual.proj" in sd else sd["text_projection"]).shape[1],
            "image_size": grid * patch, "patch_size": patch, "width": width,
            "layers": len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
            "mlp_width": hidden, "context_length": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0], "text_width": sd["ln_final.weight"].shape[0],
            "text_layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            "text_mlp_width": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        }
    except KeyError as e:
        raise CheckpointError(f"not a complete state dict of its family: missing key {e.args[0]!r}") from None
    except (IndexError, ValueError) as e:
        raise CheckpointError(f"a tensor has an unexpected shape ({e})") from None


def infer_family(sd: dict[str, Any], family: str, act: Act | None = None,
                 heads: tuple[int, int] | None = None) -> CLIPConfig:
    """The shipped architecture of ``family`` whose tensors these are. What the tensors cannot show (the RoPE
    layout, the attention pool's heads, the epsilons, the preprocessing) is the record's: a file of sizes no
    shipped record has, or of sizes several have, is refused, asking for ``arch=``."""
    got = family_shapes(sd)
    names = sorted(n for n, c in _REGISTRY.items() if c.family == family)

    def sizes(c: CLIPConfig) -> dict[str, Any]:
        v, t = c.vision, c.text
        return {"embed_dim": c.embed_dim, "image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                "layers": v.layers, "mlp_width": v.mlp_width, "context_length": t.context_length,
                "vocab_size": t.vocab_size, "text_width": t.width, "text_layers": t.layers, "text_mlp_width": t.mlp_width}

    fits = [n for n in names if sizes(_REGISTRY[n]) == got]
    if len(fits) == 1:
        cfg = _REGISTRY[fits[0]]
        if (heads is not None and tuple(heads) != (cfg.vision.heads, cfg.text.heads)) or act not in (None, cfg.act):
            raise CheckpointError(f"these are {fits[0]} weights ({family}), whose architecture record fixes the heads "
                                  f"({cfg.vision.heads} / {cfg.text.heads}) and the activation ({cfg.act}): leave out "
                                  "heads= and act=, or give the whole architecture with arch=")
        return cfg
    if fits:
        raise CheckpointError(f"these {family} weights fit {' and '.join(fits)}, which the tensors cannot tell apart: "
                              f"name one with arch= ({_NAME_IT.split(';')[0]})")
    shown = ", ".join(f"{k} {v}" for k, v in got.items())
    raise CheckpointError(f"these {family} weights ({shown}) fit no shipped {family} architecture ({', '.join(names)}): "
                          f"what the tensors do not show ({_UNSHOWN.get(family, _UNSHOWN[None])}) cannot be guessed; "
                          "give the architecture: load_clip(..., arch=CLIPConfig(...))")


#: what a family's tensors do not show (the refusal of sizes no shipped record has)
_UNSHOWN = {"siglip": "attention-pool heads, the GELU of each tower, epsilons, the tokenizer's vocabulary, preprocessing",
            None: "RoPE layout, attention-pool heads, epsilons, preprocessing"}


# ---------------------------------------------------------------------------------------------
# the architecture of a weights file (vop.load_clip)
# ---------------------------------------------------------------------------------------------
def describe(cfg: CLIPConfig) -> str:
    v, t = cfg.vision, cfg.text
    name = arch_name(cfg)
    if cfg.family != "clip":
        name = f"{name or ''} ({cfg.family})".strip()
    return (f"{name + ' ' if name else ''}({v.width}-wide {v.layers}-layer image tower with {v.heads} heads, "
            f"patch {v.patch_size}, {v.image_size} px; {t.width}-wide {t.layers}-layer text tower with {t.heads} heads)")


def check_load_options(act: Any, heads: Any) -> tuple[int, int] | None:
    """``heads=`` and ``act=`` as given to load_clip, checked (a CheckpointError naming the option)."""
    if heads is not None:
        heads = check_heads(heads)
    if act is not None and act not in ACTS:
        raise CheckpointError(f"act= must be one of {', '.join(ACTS)}, got {act!r}")
    return heads


def config_from_record(record: "ArchRecord") -> CLIPConfig:
    """The architecture a file records (vop.formats reads the record), as a CLIPConfig; a CheckpointError
    saying why it is not usable otherwise."""
    try:
        return CLIPConfig.from_dict(record.values)
    except ConfigError as e:
        raise CheckpointError(f"{record.unusable}: {e}") from None


def resolve_config(sd: dict[str, Any], record: "ArchRecord | None", arch: str | CLIPConfig | None = None,
                   act: Act | None = None, heads: tuple[int, int] | None = None) -> CLIPConfig:
    """The architecture of weights with canonical names: ``arch`` if given (the file's own record, if any,
    must agree), else the file's record (our metadata, a Hugging Face config), else inferred from the
    tensors (:func:`infer_config`). ``heads``/``act`` as checked by :func:`check_load_options`; the tensors
    are compared with the architecture, shape by shape, by :func:`vop.backbone.checkpoint.load_clip`."""
    recorded = config_from_record(record) if record is not None else None
    check_supported(sd)
    if arch is not None:
        if heads is not None:
            raise CheckpointError("give arch= or heads=, not both: the architecture fixes the head counts")
        if not isinstance(arch, (str, CLIPConfig)):
            raise CheckpointError(f"arch= must be an architecture name or a CLIPConfig, got {type(arch).__name__}")
        cfg = get_arch(arch) if isinstance(arch, str) else arch
        if recorded is not None and not same_tensors(recorded, cfg):
            raise CheckpointError(f"the file records a {describe(recorded)}, not the {describe(cfg)} named by arch=")
    elif recorded is not None:
        cfg = recorded
    else:
        return infer_config(sd, act=act, heads=heads)
    return cfg if act is None else dataclasses.replace(cfg, act=act)
