"""Load and save CLIP backbones: the weights in any CLIP format vop.formats reads, as vop's CLIP.

One direction: the weights file is read by vop.formats (format detected by content; tensors with
OpenAI's names; the architecture the file records, if any), the architecture is resolved
(:func:`vop.backbone.config.resolve_config`: ``arch=``, else the file's record, else inferred from
the tensors), the tensors are compared with it shape by shape, then the CLIP is built and loaded.
Formats: OpenAI TorchScript archives (read as data, never run), open_clip / PyTorch state dicts,
``.safetensors`` files and Hugging Face ``CLIPModel`` folders (vop.formats lists them).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from vop import formats
from vop.backbone.clip import CLIP
from vop.backbone.config import (CLIPConfig, arch_name, check_load_options, config_from_record, describe, get_arch,
                                 is_arch, parameter_count, resolve_config)
from vop.errors import CheckpointError, ConfigError
from vop.formats import ClipWeights, hf_clip, safetensors_clip
from vop.formats.hf_clip import convert_hf  # noqa: F401  (its home before vop.formats)

FORMATS = formats.expected()
_META_KEY = safetensors_clip.META_KEY
_describe = describe


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file or folder into (state dict with raw keys, metadata) (vop.formats.read_raw)."""
    return formats.read_raw(path)


def _hf_config(c: Any) -> CLIPConfig:
    """A Hugging Face CLIPModel ``config.json`` as a CLIPConfig; every value it gives checked (types, ranges:
    vop.limits) before anything is built, a CheckpointError naming the key otherwise."""
    return config_from_record(hf_clip.arch_record(c))


def to_openai(sd: dict[str, torch.Tensor], meta: dict[str, Any], act: str | None = None,
              heads: tuple[int, int] | None = None,
              arch: str | CLIPConfig | None = None) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Normalise keys to OpenAI names (vop.formats.canonical) and work out the architecture
    (:func:`vop.backbone.config.resolve_config`). Every record and ``heads=``/``act=`` is checked before
    use (vop.limits); the tensors are compared with the architecture, shape by shape, by :func:`load_clip`."""
    heads = check_load_options(act, heads)
    sd, record = formats.canonical(sd, meta)
    return sd, resolve_config(sd, record, arch=arch, act=act, heads=heads)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _check_clip_fits(cfg: CLIPConfig, what: str) -> None:
    """Refuse (ConfigError) to build a CLIP whose float32 weights exceed the free memory of the CPU."""
    from vop.memory import check_fits

    n = parameter_count(cfg)
    check_fits(4 * n, "cpu", f"the CLIP backbone {what} ({n:,} float32 parameters)",
               "use a smaller architecture (vop.list_archs())")


def attach_tokenizer(clip: CLIP, tokenizer: str | os.PathLike | None, weights: str | os.PathLike | None = None,
                     error: type = CheckpointError) -> CLIP:
    """Give ``clip`` the tokenizer file its text tower reads (SigLIP: ``tokenizer.json`` or a SentencePiece
    ``.model``): ``tokenizer`` if given (it must exist), else one shipped in the weights' folder
    (vop.backbone.tokenizer.find_tokenizer_file), else none (``clip.tokenizer()`` then says how to give one). The
    file is read when the tokenizer is first made. A backbone with CLIP's BPE (shipped) refuses ``tokenizer=``."""
    from vop.backbone.tokenizer import find_tokenizer_file

    if tokenizer is not None:
        if not isinstance(tokenizer, (str, os.PathLike)):
            raise error(f"tokenizer= must be the path of a tokenizer file, got {type(tokenizer).__name__}")
        if clip.cfg.text.tokenizer == "clip":
            raise error(f"tokenizer={str(tokenizer)!r} gives a tokenizer file, but this backbone's text tower uses CLIP's "
                        "BPE, which vop ships: leave it out (it is for backbones whose vocabulary vop does not ship: "
                        "SigLIP / SigLIP2)")
        p = Path(tokenizer)
        if not (p.is_file() or (p.is_dir() and find_tokenizer_file(p / "x") is not None)):
            raise error(f"tokenizer file {p}: no such file (give the tokenizer.json of the weights' folder, or a "
                        "SentencePiece .model)")
        clip.tokenizer_file = p
    elif clip.cfg.text.tokenizer != "clip" and weights is not None:
        clip.tokenizer_file = find_tokenizer_file(weights)
    return clip


def build_clip(arch: str | CLIPConfig, seed: int | None = None, tokenizer: str | os.PathLike | None = None) -> CLIP:
    """A randomly initialised CLIP of a registered architecture (for tests, counts and pretraining); ``tokenizer``:
    the tokenizer file of a text tower whose vocabulary vop does not ship (SigLIP; see :func:`load_clip`)."""
    cfg = get_arch(arch) if isinstance(arch, str) else arch
    if not isinstance(cfg, CLIPConfig):
        raise ConfigError(f"build_clip: an architecture name or a CLIPConfig, got {type(cfg).__name__}")
    _check_clip_fits(cfg, arch_name(cfg) or "this architecture")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            clip = CLIP(cfg)
    else:
        clip = CLIP(cfg)
    return attach_tokenizer(clip, tokenizer, error=ConfigError)


def shipped_file(name: str) -> Path | None:
    """The file of weights shipped with vop under ``name`` (``vop/assets/<name>.safetensors``), if there is one."""
    from importlib import resources

    f = resources.files("vop").joinpath("assets", f"{name}.safetensors")
    return Path(str(f)) if f.is_file() else None


_shipped = shipped_file


def weights_path(path_or_name: str | os.PathLike) -> Path:
    """The file a backbone is read from: a path as given, else a shipped name's file; an architecture name
    is refused (it names no weights)."""
    p = Path(path_or_name)
    if not p.exists() and isinstance(path_or_name, str):
        shipped = shipped_file(path_or_name)
        if shipped is not None:
            p = shipped
        elif is_arch(path_or_name):
            raise CheckpointError(
                f"{path_or_name!r} is an architecture, not weights: give a weights file "
                f"(nothing is downloaded), or use vop.build_clip({path_or_name!r}) for random weights"
            )
    return p


def clip_config(weights: ClipWeights, arch: str | CLIPConfig | None = None, act: str | None = None,
                heads: tuple[int, int] | None = None) -> CLIPConfig:
    """The architecture of weights read by vop.formats (see :func:`load_clip`; ``act``/``heads`` as
    :func:`vop.backbone.config.check_load_options` checks them); errors name the file."""
    try:
        return resolve_config(weights.tensors, weights.record, arch=arch, act=act, heads=heads)  # type: ignore[arg-type]
    except CheckpointError as e:
        raise CheckpointError(f"{weights.path}: {e}") from None


def clip_from_weights(weights: ClipWeights, cfg: CLIPConfig, named: bool = False) -> CLIP:
    """The CLIP of ``cfg`` holding ``weights``: compared with the architecture tensor by tensor (on the meta
    device) and the memory checked, before it is built. ``named``: ``cfg`` was named by arch=."""
    p = weights.path
    sd = {k: v for k, v in weights.tensors.items() if k != "attn_mask"}
    with torch.device("meta"):
        expected = CLIP(cfg).state_dict()
    missing = [k for k in expected if k not in sd]
    bad = next((k for k in expected if k not in sd or sd[k].shape != expected[k].shape), None)
    if bad is not None:
        got = "missing" if bad not in sd else f"of shape {tuple(sd[bad].shape)}"
        raise CheckpointError(
            f"{p}: does not fit the architecture {describe(cfg)}{' named by arch=' if named else ''}: "
            f"{bad} is {got}, expected {tuple(expected[bad].shape)} ({len(missing)} tensors missing in all)"
        )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointError(f"{p}: does not match a CLIP ViT ({len(unexpected)} unexpected tensors, e.g. "
                              f"{unexpected[:3]}); expected {FORMATS}")
    try:
        _check_clip_fits(cfg, f"of {p}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = CLIP(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def load_clip(path_or_name: str | os.PathLike, *, arch: str | CLIPConfig | None = None, act: str | None = None,
              heads: tuple[int, int] | None = None, tokenizer: str | os.PathLike | None = None) -> CLIP:
    """Load CLIP weights from any supported format (vop.formats), or a shipped name.

    ``arch`` names the architecture (``"ViT-H-14"``, see ``list_archs()``, or a CLIPConfig); the
    tensors must then fit it exactly. Without it, the file's own record is used (our safetensors
    metadata, a Hugging Face config.json), else the architecture is inferred from the tensors (see
    ``infer_config``): a CheckpointError says when the head counts cannot be known. ``act`` overrides
    the activation (released OpenAI weights use QuickGELU; most LAION open_clip weights use GELU and
    cannot be told apart from the tensors). ``heads=(vision_heads, text_heads)`` sets the head counts
    of a file without an architecture record. ``tokenizer``: the tokenizer file of a text tower whose vocabulary
    vop does not ship (SigLIP / SigLIP2: the ``tokenizer.json`` of the weights' folder, or a SentencePiece
    ``.model``); without it, a ``tokenizer.json`` in the weights' folder is used (nothing is downloaded).
    """
    p = weights_path(path_or_name)
    try:  # the options first: nothing is read for a call that cannot succeed
        check_load_options(act, heads)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    weights = formats.read_clip(p)  # format by content -> tensors with OpenAI names + the file's record
    cfg = clip_config(weights, arch=arch, act=act, heads=heads)  # -> the architecture
    clip = clip_from_weights(weights, cfg, named=arch is not None)  # -> checked against the tensors, built
    try:
        return attach_tokenizer(clip, tokenizer, weights=p)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None


def save_clip(model: CLIP, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Save as safetensors with OpenAI names and the architecture in the metadata (vop.formats.safetensors_clip)."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items()}
    safetensors_clip.write(sd, path, model.cfg.key())


def weights_fingerprint(model: CLIP) -> str:
    """A short hash of the backbone weights: architecture plus a fixed strided sample of each tensor.

    Exact bytes of float32 values are hashed, so it is the same on every machine and device.
    """
    h = hashlib.sha256(model.cfg.key().encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
