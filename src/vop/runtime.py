"""What training, evaluation and the search service share when they run a model: which device, which
autocast dtype, and batched text and video embeddings as the model's scoring stores and scores them.

One implementation for ``vop train``/``vop eval`` (:mod:`vop.engine`) and ``vop index``/``vop search``/
``vop serve`` (:mod:`vop.retrieval`), so that an index of a dataset split and a query encode exactly as
the evaluation does. It sits below both: it imports neither (nor the CLI).

- :func:`resolve_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` -> a ``torch.device`` (the process's
  own GPU under torchrun), a clear ConfigError for anything else.
- :func:`autocast_dtype`: bf16 on CUDA (fp16 if asked or unsupported), none (fp32) on the CPU.
- :func:`embed_tokens`, :func:`embed_video_batch`: one batch -> float32 CPU queries / rows.
- :func:`encode_texts`, :func:`encode_videos`: every caption / every decodable video of a gallery, batched.

What a batch becomes is the model's :attr:`~vop.methods.base.VideoTextModel.scoring`'s (:mod:`vop.scoring`):
a dual encoder's L2-normalised vectors (N, D); for cma's query score the raw text (N, D) and per-frame
video embeddings (V, F, D), not normalised. Scores come from the same object (``scoring.matrix`` for
a whole gallery, in bounded blocks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from vop.errors import ConfigError

if TYPE_CHECKING:
    from vop.data.dataset import VideoDataset
    from vop.methods.base import VideoTextModel

__all__ = ["resolve_device", "autocast_dtype", "autocast", "embed_tokens", "embed_video_batch", "encode_texts",
           "encode_videos"]

_CHOICES = "use auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device = "auto", *, local_rank: int | None = None, what: str = "--device") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; a ConfigError naming ``what`` otherwise,
    also for CUDA on a machine without it and for a GPU index it does not have.

    ``local_rank`` (a torchrun process's): every CUDA choice, ``auto`` included when CUDA is there,
    becomes that process's own GPU ``cuda:<local_rank>``.
    """
    if isinstance(spec, torch.device):
        dev = spec
    elif spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device("cuda")
    else:
        try:
            dev = torch.device(spec)
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(f"{what} {spec!r}: {_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} {str(spec)!r}: {_CHOICES}")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} {spec}: CUDA is not available here; use {what} cpu (or auto)")
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {spec}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device: bf16 on CUDA (fp16 if asked), none (fp32) on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; disabled (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def embed_tokens(model: "VideoTextModel", tokens: torch.Tensor, device: torch.device,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """The queries (B, D), float32 on the CPU, of a batch of tokenised captions: ``model.scoring.queries``
    of its ``encode_text`` (a dual encoder: L2-normalised; cma's query score: raw, the text's norm
    enters its scores)."""
    tokens = tokens.to(device)
    with autocast(device, dtype):
        return model.scoring.queries(model.encode_text(tokens).float()).cpu()


@torch.no_grad()
def embed_video_batch(model: "VideoTextModel", video: torch.Tensor, device: torch.device,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """The rows, float32 on the CPU, of a batch of decoded videos: uint8 frames (B, F, 3, H, W) at the
    model's input size, as the data loaders give them -> ``model.scoring.rows`` of its ``encode_video``
    (a dual encoder: L2-normalised (B, D); cma's query score: the raw per-frame embeddings (B, F, D))."""
    from vop.data.transforms import to_model_input

    x = to_model_input(video.to(device, non_blocking=True), preprocess=model.clip.preprocess)
    with autocast(device, dtype):
        return model.scoring.rows(model.encode_video(x).float()).cpu()


def _empty(model: "VideoTextModel", video: bool = False) -> torch.Tensor:
    dim = model.clip.cfg.embed_dim
    return torch.zeros(0, *(model.scoring.row_shape(model.frames, dim) if video else (dim,)))


@torch.no_grad()
def encode_texts(model: "VideoTextModel", captions: Sequence[str], *, batch_size: int = 256,
                 device: torch.device | str = "cpu", max_words: int | None = 32, precision: str = "auto",
                 progress: bool = False, tokenizer: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """Caption queries (N, D), float32 on the CPU (:func:`embed_tokens`: L2-normalised for a dual encoder).

    ``tokenizer``: one already built (``model.tokenizer(max_words=...)``), instead of building one
    with ``max_words``."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    tok = tokenizer or model.tokenizer(max_words=max_words)
    dtype = autocast_dtype(device, precision)
    out = []
    it = range(0, len(captions), batch_size)
    for i in tqdm(it, desc="texts", disable=not progress, leave=False):
        out.append(embed_tokens(model, tok(list(captions[i : i + batch_size])), device, dtype))
    return torch.cat(out) if out else _empty(model)


def check_geometry(model: "VideoTextModel", preprocess: Any, what: str) -> None:
    """Frames resized for another backbone are refused (a ConfigError): ``preprocess`` (a dataset's; None: CLIP's
    shortest side + centre crop, bicubic) must resize as ``model.clip.preprocess`` does (PE-Core squashes,
    bilinear), or the embeddings would silently be of other pixels."""
    want = model.clip.preprocess
    have = ("crop", "bicubic") if preprocess is None else (preprocess.resize, preprocess.interpolation)
    if have != (want.resize, want.interpolation):
        raise ConfigError(f"{what} are resized as {have[0]}/{have[1]}, but this backbone was trained on frames resized "
                          f"as {want.resize}/{want.interpolation}: build the dataset with preprocess=model.clip.preprocess "
                          "(get_dataset(..., preprocess=...))")


@torch.no_grad()
def encode_videos(model: "VideoTextModel", videos: "VideoDataset", *, batch_size: int = 16,
                  device: torch.device | str = "cpu", num_workers: int = 0, precision: str = "auto",
                  progress: bool = False) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """The rows of every decodable gallery video (:func:`embed_video_batch`).

    Returns (rows (V, *row_shape) float32 CPU: a dual encoder's L2-normalised (V, D), cma's query score's
    raw per-frame (V, F, D); their video ids in gallery order; failures {id: reason}).
    """
    from tqdm.auto import tqdm

    from vop.data import build_loader

    check_geometry(model, getattr(videos, "preprocess", None), "the videos")
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    loader = build_loader(videos, batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    embs, ids = [], []
    for batch in tqdm(loader, desc="videos", disable=not progress, leave=False):
        embs.append(embed_video_batch(model, batch["video"], device, dtype))
        ids.extend(batch["video_id"])
    failures = {k: f.error for k, f in loader.failures.items()}
    emb = torch.cat(embs) if embs else _empty(model, video=True)
    return emb, ids, failures
