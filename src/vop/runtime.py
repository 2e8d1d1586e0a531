"""What training, evaluation and the search service share when they run a model: which device, which
autocast dtype, and batched L2-normalised text and video embeddings.

One implementation for ``vop train``/``vop eval`` (:mod:`vop.engine`) and ``vop index``/``vop search``/
``vop serve`` (:mod:`vop.retrieval`), so that an index of a dataset split and a query encode exactly as
the evaluation does. It sits below both: it imports neither (nor the CLI).

- :func:`resolve_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` -> a ``torch.device`` (the process's
  own GPU under torchrun), a clear ConfigError for anything else.
- :func:`autocast_dtype`: bf16 on CUDA (fp16 if asked or unsupported), none (fp32) on the CPU.
- :func:`embed_tokens`, :func:`embed_video_batch`: one batch -> L2-normalised float32 CPU embeddings.
- :func:`encode_texts`, :func:`encode_videos`: every caption / every decodable video of a gallery, batched.
- :func:`pairwise_similarity`: the texts x videos score matrix of a *pairwise* model, in bounded chunks.

Pairwise models (``model.pairwise``, e.g. Cross-Modal Adapter's query-score pooling) are not dual
encoders: a video's pooled embedding depends on the text. For them the embeddings are kept raw (as the
model's ``similarity`` needs them: text (N, D), per-frame video embeddings (V, F, D), float32, not
normalised) and scores come from ``model.similarity`` (:func:`pairwise_similarity`). Dual encoders are
unchanged: L2-normalised (N, D) embeddings, scores are dot products.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from vop.errors import ConfigError

if TYPE_CHECKING:
    from vop.data.dataset import VideoDataset
    from vop.methods.base import VideoTextModel

__all__ = ["resolve_device", "autocast_dtype", "autocast", "embed_tokens", "embed_video_batch", "encode_texts",
           "encode_videos", "is_pairwise", "pairwise_similarity", "pairwise_chunks", "PAIRWISE_CHUNK_BYTES"]

#: the most bytes one (texts x videos x frames) float32 block of :func:`pairwise_similarity` may take; the
#: similarity holds about five such tensors at once (cma's query score), so ~5 x this at peak
PAIRWISE_CHUNK_BYTES = 64 << 20

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


def is_pairwise(model: "VideoTextModel") -> bool:
    """Whether ``model`` scores a text against a video's frames (``model.pairwise``, read on the instance:
    a method may decide from its options) rather than with one vector per video."""
    return bool(getattr(model, "pairwise", False))


@torch.no_grad()
def embed_tokens(model: "VideoTextModel", tokens: torch.Tensor, device: torch.device,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """L2-normalised embeddings (B, D), float32 on the CPU, of a batch of tokenised captions (a pairwise
    model: its raw ``encode_text``, not normalised: the text's norm enters its similarity)."""
    tokens = tokens.to(device)
    with autocast(device, dtype):
        t = model.encode_text(tokens).float()
        return (t if is_pairwise(model) else F.normalize(t, dim=-1)).cpu()


@torch.no_grad()
def embed_video_batch(model: "VideoTextModel", video: torch.Tensor, device: torch.device,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """L2-normalised embeddings (B, D), float32 on the CPU, of a batch of decoded videos: uint8
    frames (B, F, 3, H, W) at the model's input size, as the data loaders give them. A pairwise model:
    its raw per-frame embeddings (B, F, D), float32, not normalised."""
    from vop.data.transforms import to_model_input

    x = to_model_input(video.to(device, non_blocking=True))
    with autocast(device, dtype):
        v = model.encode_video(x).float()
        if is_pairwise(model):
            if v.dim() != 3:
                raise ValueError(f"a pairwise model's encode_video must return per-frame embeddings (B, F, D), "
                                 f"got {tuple(v.shape)}")
            return v.cpu()
        return F.normalize(v, dim=-1).cpu()


def _empty(model: "VideoTextModel", video: bool = False) -> torch.Tensor:
    if video and is_pairwise(model):
        return torch.zeros(0, model.frames, model.clip.cfg.embed_dim)
    return torch.zeros(0, model.clip.cfg.embed_dim)


@torch.no_grad()
def encode_texts(model: "VideoTextModel", captions: Sequence[str], *, batch_size: int = 256,
                 device: torch.device | str = "cpu", max_words: int | None = 32, precision: str = "auto",
                 progress: bool = False, tokenizer: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """L2-normalised caption embeddings (N, D), float32 on the CPU (a pairwise model: raw, see
    :func:`embed_tokens`).

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


@torch.no_grad()
def encode_videos(model: "VideoTextModel", videos: "VideoDataset", *, batch_size: int = 16,
                  device: torch.device | str = "cpu", num_workers: int = 0, precision: str = "auto",
                  progress: bool = False) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """L2-normalised video embeddings of every decodable gallery video.

    Returns (embeddings (V, D) float32 CPU, their video ids in gallery order, failures {id: reason}).
    A pairwise model: its raw per-frame embeddings (V, F, D) float32 CPU instead (:func:`embed_video_batch`).
    """
    from tqdm.auto import tqdm

    from vop.data import build_loader

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


def pairwise_chunks(texts: int, frames: int, videos: int, max_bytes: int | None = None,
                    text_chunk: int = 256) -> tuple[int, int]:
    """(texts, videos) per block so that one texts x videos x frames float32 tensor stays within
    ``max_bytes`` (at least one of each): up to ``text_chunk`` texts, then as many videos as fit."""
    max_bytes = max_bytes or PAIRWISE_CHUNK_BYTES
    tc = max(1, min(texts, text_chunk, max_bytes // (4 * max(frames, 1))))
    vc = max(1, min(max(videos, 1), max_bytes // (4 * max(frames, 1) * tc)))
    return tc, vc


@torch.no_grad()
def pairwise_similarity(model: "VideoTextModel", text_emb: torch.Tensor, video_emb: torch.Tensor, *,
                        device: torch.device | str | None = None, max_bytes: int | None = None,
                        text_chunk: int = 256) -> torch.Tensor:
    """The (T, V) score matrix of a pairwise model, ``model.similarity(text (T, D), frames (V, F, D))``
    (unscaled: cosines for cma), built block by block on ``device`` (default: where the embeddings are)
    and gathered on the CPU, so that no texts x videos x frames tensor larger than ``max_bytes`` (float32;
    default :data:`PAIRWISE_CHUNK_BYTES`) exists; the texts x videos matrix is the only full-size result.
    Each block is the model's similarity of a chunk of texts with a chunk of videos (the similarity is
    computed per pair: any block is that block of the full matrix).
    The result's dtype is that of the similarity (float32 for float32 embeddings). A small ``max_bytes``
    goes down to one text x one video per block (and never below)."""
    t, v = text_emb, video_emb
    if t.dim() != 2 or v.dim() != 3 or t.shape[-1] != v.shape[-1]:
        raise ValueError(f"a pairwise similarity needs text (T, D) and per-frame video embeddings (V, F, D), got "
                         f"{tuple(t.shape)} and {tuple(v.shape)}")
    T, V, Fr = t.shape[0], v.shape[0], v.shape[1]
    dev = torch.device(device) if device is not None else t.device
    out_dtype = torch.promote_types(torch.promote_types(t.dtype, v.dtype), torch.float32)
    out = torch.empty(T, V, dtype=out_dtype)
    if T == 0 or V == 0:
        return out
    tc, vc = pairwise_chunks(T, Fr, V, max_bytes, text_chunk)
    for v0 in range(0, V, vc):
        frames = v[v0:v0 + vc].to(dev)
        for t0 in range(0, T, tc):
            out[t0:t0 + tc, v0:v0 + vc] = model.similarity(t[t0:t0 + tc].to(dev), frames).to(out_dtype).cpu()
    return out
