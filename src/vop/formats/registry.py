"""The registry of checkpoint formats, and the one path that reads CLIP weights through it.

A format module describes itself with one :class:`Format` (``register(Format(...))`` at its end): its
name, how "expected ..." messages list it, and the hooks of the roles it plays:

- a **file** format recognises a file by its bytes (``is_file``) and reads it into tensors with the
  file's own names plus its metadata (``read_file``);
- a **folder** format recognises a folder by its files (``is_folder``) and reads it the same way;
- a **names** format recognises a naming scheme by the tensor names (``has_names``) and converts them
  to the canonical names (OpenAI's CLIP names), with the architecture the file records, if any
  (``to_canonical``);
- ``arch_record`` gives the architecture record a file's metadata holds (our safetensors files);
- ``beside`` gives records found next to a file (a Hugging Face config.json beside its weights);
- a **checkpoint** format recognises a trained model (``is_checkpoint``: vop's prompt checkpoints,
  the authors' ModelScope folders), read by its own module's functions.

Within a role, formats are tried in registration order, those marked ``fallback`` after all others.
Nothing here builds a model or knows a method: records are plain data (:class:`ArchRecord`) that
vop.backbone turns into an architecture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vop.errors import CheckpointError

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ArchRecord:
    """An architecture a file records, in ``CLIPConfig.to_dict``'s layout (what the format could check of
    it, checked; vop.backbone builds the CLIPConfig). ``unusable``: how an error about it begins."""
    values: Any
    unusable: str


@dataclass
class ClipWeights:
    """CLIP weights as read: tensors with canonical (OpenAI) names and the architecture record, if any;
    ``format``: the file or folder format that read them, ``names``: the names format that converted them."""
    path: Path
    tensors: Tensors
    record: ArchRecord | None
    format: str = ""
    names: str = ""


@dataclass(frozen=True)
class Format:
    name: str
    describe: str | None = None  # how "expected ..." lists it (None: not a CLIP-weights format)
    is_file: Callable[[Path], bool] | None = None
    read_file: Callable[[Path], tuple[Tensors, dict[str, Any]]] | None = None
    is_folder: Callable[[Path], bool] | None = None
    read_folder: Callable[[Path], tuple[Tensors, dict[str, Any]]] | None = None
    has_names: Callable[[Tensors], bool] | None = None
    to_canonical: Callable[[Tensors, dict[str, Any]], tuple[Tensors, ArchRecord | None]] | None = None
    arch_record: Callable[[dict[str, Any]], ArchRecord | None] | None = None
    beside: Callable[[Path, Tensors], dict[str, Any]] | None = None
    is_checkpoint: Callable[[Path], bool] | None = None
    fallback: bool = False  # tried after every format of its role that is not a fallback


_FORMATS: list[Format] = []


def register(fmt: Format) -> Format:
    if any(f.name == fmt.name for f in _FORMATS):
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    _FORMATS.append(fmt)
    return fmt


def list_formats() -> list[Format]:
    return list(_FORMATS)


def _tried(hook: str) -> list[Format]:
    """The formats with ``hook``, in the order they are tried."""
    have = [f for f in _FORMATS if getattr(f, hook) is not None]
    return [f for f in have if not f.fallback] + [f for f in have if f.fallback]


def expected() -> str:
    """The CLIP-weights formats, as messages list them ("an OpenAI TorchScript .pt, ..., or ...")."""
    names = [f.describe for f in _FORMATS if f.describe]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])}, or {names[-1]}"


def reason(e: BaseException) -> str:
    """The first line of an exception's message (its type if it has none). ``torch.load(weights_only=True)``
    refusing a pickle: what the pickle asked for, without torch's advice to retry with ``weights_only=False``
    (which runs the file's code: a weights file never needs it)."""
    text = str(e).strip()
    if text.startswith("Weights only load failed"):
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip() and not ln.strip().startswith("Check the documentation")]
        asked = lines[0].rstrip(".") if lines else "an object that is not a tensor"
        return (f"the pickle is not plain weights: {asked[0].lower() + asked[1:]}; refused by a weights-only reader, "
                "nothing of it was run")
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# CLIP weights: bytes -> tensors with the file's names -> canonical names + architecture record
# ---------------------------------------------------------------------------------------------
def read_raw(path: str | os.PathLike) -> tuple[Tensors, dict[str, Any]]:
    """A weights file or folder as (tensors with the file's own names, metadata)."""
    return _read_raw(Path(path))[1:]


def _read_raw(path: Path) -> tuple[Format, Tensors, dict[str, Any]]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected {expected()}")
    try:
        if path.is_dir():
            fmt = next((f for f in _tried("is_folder") if f.is_folder(path)), None)  # type: ignore[misc]
            if fmt is None:
                raise CheckpointError(f"{path}: a folder no format reads; expected {expected()}")
            return (fmt, *fmt.read_folder(path))  # type: ignore[misc]
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty; expected {expected()}")
        fmt = next(f for f in _tried("is_file") if f.is_file(path))  # type: ignore[misc]  (the state dict is the fallback)
        sd, meta = fmt.read_file(path)  # type: ignore[misc]
        for f in _tried("beside"):
            meta.update(f.beside(path, sd))  # type: ignore[misc]
        return fmt, sd, meta
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, bad pickle, safetensors header errors ...
        raise CheckpointError(f"{path}: cannot be read as a CLIP checkpoint ({reason(e)}); expected {expected()}") from None


_WRAPPERS = ("module.", "model.", "clip.")  # DataParallel and wrapper modules
_SCALARS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archive, not tensors of the model


def canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Tensors, ArchRecord | None]:
    """Canonical (OpenAI CLIP) names and the architecture record: wrapper prefixes stripped, then the
    first names format that recognises the names converts them; the record is the one the names'
    format reads (a Hugging Face config.json), else the file's own (our safetensors metadata)."""
    return _canonical(sd, meta)[1:]


def _canonical(sd: Tensors, meta: dict[str, Any]) -> tuple[Format, Tensors, ArchRecord | None]:
    for prefix in _WRAPPERS:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _SCALARS}
    fmt = next(f for f in _tried("has_names") if f.has_names(sd))  # type: ignore[misc]  (OpenAI names: the fallback)
    sd, record = fmt.to_canonical(sd, meta)  # type: ignore[misc]
    for f in _tried("arch_record"):
        if record is None:
            record = f.arch_record(meta)  # type: ignore[misc]
    return fmt, sd, record


def read_clip(path: str | os.PathLike) -> ClipWeights:
    """Read CLIP weights in any registered format: canonical names, the architecture record if any."""
    path = Path(path)
    fmt, sd, meta = _read_raw(path)
    try:
        names, sd, record = _canonical(sd, meta)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return ClipWeights(path, sd, record, fmt.name, names.name)


# ---------------------------------------------------------------------------------------------
# trained models
# ---------------------------------------------------------------------------------------------
def checkpoint_format(path: str | os.PathLike) -> Format:
    """The format of a trained model's checkpoint (a file or a folder), by content."""
    path = Path(path)
    return next(f for f in _tried("is_checkpoint") if f.is_checkpoint(path))  # type: ignore[misc]  (vop's: the fallback)
