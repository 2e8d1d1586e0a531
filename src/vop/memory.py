"""How much memory a model or a training step needs, and how much this machine has: checked before
anything large is allocated, so that a model or step that cannot fit fails with one clear message
naming the setting to lower instead of dying in the allocator (or swapping the machine to a halt).

- :func:`available_memory`: bytes free for a new allocation on a device: ``MemAvailable`` of
  ``/proc/meminfo`` (lowered to the cgroup limit minus usage inside a container) on the CPU,
  ``torch.cuda.mem_get_info`` (plus what PyTorch's caching allocator holds unused) on a GPU; None where
  it cannot be read (then nothing is refused).
- :func:`check_fits`: a ConfigError when an estimate exceeds what is available.
- :func:`estimate_train_step`: a training step of ``vop train``, term by term (below);
  :func:`estimate_model_step` fills it in from a model (built on the meta device: no memory).

The training-step estimate, in bytes (fp32 weights, AdamW; ``b`` the videos of one micro-batch =
``optim.batch_size / processes / optim.accumulate``, ``F`` frames, ``S`` the input size, ``T`` the
trainable parameters):

    total = weights + inputs + 8 T + max(activations, 4 T)

    weights      4 x (all parameters)                          (backbone + the method's new tensors)
    inputs       2 x 4 x b x F x 3 x S^2                       (the batch and its normalised copy)
    8 T                                                        (AdamW's two moments, from step to step)
    max(...)     the activations of the forward pass, or the gradients (4 T) once those are freed
    activations  e x sum over towers of  n x L x blocks x a    (what autograd keeps for the backward)

with ``n`` sequences (``b x F`` frames, ``b`` captions), ``L`` tokens per sequence (image: 1 + (S/P)^2 +
video prompts; text: the caption budget + text prompts), ``e`` bytes per element (4; 2 under bf16/fp16
autocast), and ``a`` elements kept per token and block: ``6 d + k m`` (d the width, m the MLP width:
the LayerNorm inputs, q/k/v, the attention output and the activation's input, plus its sigmoid for
QuickGELU: k = 2; GELU: k = 1) when the weight matrices are frozen (prompts, adapters, biases: a frozen
matrix keeps nothing of its input), ``9 d + (k + 1) m`` when they train (``full``: also every weight
matrix's input). With gradient checkpointing a block keeps only its input (``d``), and one block at a
time its full ``a``. ``blocks``: those from the first block that needs a gradient (the earlier of the
method's own entry point, ``VideoTextModel.grad_start``, and the first CLIP block with a trainable
tensor; :func:`kept_blocks`), so nothing for a step that trains nothing (zero-shot) or only the
projections.

The activation term matches what autograd keeps: 381 MB estimated, 385 MB of saved tensors counted
with ``torch.autograd.graph.saved_tensors_hooks`` for vop on ViT-B/32 (224 px, 4 videos x 4 frames).
The estimate leaves out the method's own modules' activations (adapters, prompt generators), the
gradients that exist while activations are still held, temporaries and the allocator's slack: it is a
lower bound of the peak. Measured on CPU (peak resident memory of two real steps above the memory
before them, tests/scripts/step_memory.py), the peak is 1.3-1.7x the estimate for ViT-S/32, ViT-B/32
and the tiny towers (vop, full, partial, dgl), up to 2.5x with gradient checkpointing (its
recomputation is not counted) and when only the projections train (fixed costs dominate a tiny
step). A step whose estimate exceeds the memory available cannot run, and is refused; one within it
may still fail (the allocator's message then says so).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from vop.errors import ConfigError

if TYPE_CHECKING:
    from vop.backbone.config import CLIPConfig

__all__ = ["available_memory", "check_fits", "estimate_train_step", "format_bytes", "parameter_bytes"]


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text in ("", "max") else int(text)
    except (OSError, ValueError):
        return None


def _cpu_available() -> int | None:
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    if avail is None:
        return None
    # a container's own limit (cgroup v2, then v1) may be lower than the machine's free memory
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):
            avail = min(avail, max(0, limit - usage))
            break
    return avail


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation on ``device`` can take now; None where that cannot be read."""
    device = torch.device(device)
    if device.type == "meta":
        return None
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except Exception:  # no driver, a device index out of range: the allocator reports it later
            return None
    if device.type == "cpu":
        return _cpu_available()
    return None


def check_fits(needed: float, device: torch.device | str, what: str, hint: "str | Callable[[], str]") -> None:
    """A ConfigError if ``needed`` bytes (``what``: the thing that needs them) exceed what ``device`` has
    free; ``hint``: which setting to lower (or a function that works it out, called only then). Nothing
    is refused where the free memory cannot be read."""
    avail = available_memory(device)
    if avail is not None and needed > avail:
        text = hint() if callable(hint) else hint
        raise ConfigError(f"{what}: about {format_bytes(needed)} ({int(needed):,} bytes) needed, but only "
                          f"{format_bytes(avail)} is available on {torch.device(device)}: {text}")


def _kept_per_token(width: int, mlp: int, quick_gelu: bool, trains_weights: bool) -> int:
    """The module docstring's ``a``: elements autograd keeps per token and block."""
    k = 2 if quick_gelu else 1  # QuickGELU keeps its input and its sigmoid, GELU its input
    return 6 * width + k * mlp + ((3 * width + mlp) if trains_weights else 0)


def _tower_activations(n: int, tokens: int, width: int, mlp: int, quick_gelu: bool, kept: tuple[int, int],
                       checkpointing: bool) -> float:
    """Elements autograd keeps for ``n`` sequences of ``tokens``; ``kept``: (blocks with frozen weights,
    blocks whose weight matrices train) that lie after the first thing that needs a gradient."""
    frozen, training = kept
    if not frozen + training:
        return 0.0
    light, heavy = _kept_per_token(width, mlp, quick_gelu, False), _kept_per_token(width, mlp, quick_gelu, True)
    if checkpointing:
        return n * tokens * ((frozen + training) * width + (heavy if training else light))
    return n * tokens * (frozen * light + training * heavy)


def estimate_train_step(cfg: "CLIPConfig", *, parameters: int, trainable: int, batch: int, frames: int, image_size: int,
                        text_tokens: int, video_prompts: int = 0, text_prompts: int = 0,
                        kept: dict[str, tuple[int, int]] | None = None, grad_checkpointing: bool = False,
                        amp: bool = False) -> dict[str, Any]:
    """The memory of one training step in bytes (the formula is in the module docstring), term by term:
    ``weights``, ``inputs``, ``optimizer``, ``gradients``, ``activations`` and their ``total``.

    ``parameters``/``trainable``: the model's parameter counts (all, and what the optimiser updates);
    ``batch``: videos per micro-batch; ``text_tokens``: the caption budget; ``kept``: per tower
    (``"visual"``, ``"text"``), the blocks whose activations the backward pass needs, as (with frozen
    weight matrices, with training ones); default: every block, frozen (prompt tuning's case).
    :func:`estimate_model_step` fills these in from a model."""
    v, t = cfg.vision, cfg.text
    kept = kept or {"visual": (v.layers, 0), "text": (t.layers, 0)}
    e = 2 if amp else 4
    quick = cfg.act == "quick_gelu"
    grid = image_size // v.patch_size
    video_tokens = 1 + grid * grid + video_prompts
    caption = text_tokens + text_prompts
    act = 0.0
    if trainable:
        act += _tower_activations(batch * frames, video_tokens, v.width, v.mlp_width, quick, kept["visual"],
                                  grad_checkpointing)
        act += _tower_activations(batch, caption, t.width, t.mlp_width, quick, kept["text"], grad_checkpointing)
    out = {
        "weights": 4 * parameters,
        "inputs": 2 * 4 * batch * frames * 3 * image_size * image_size,
        "optimizer": 8 * trainable,
        "gradients": 4 * trainable,
        "activations": e * act,
        "video_tokens": video_tokens,
        "text_tokens": caption,
    }
    out["total"] = (out["weights"] + out["inputs"] + out["optimizer"] + max(out["activations"], out["gradients"])
                    if trainable else out["weights"] + out["inputs"])
    return out


def kept_blocks(model: Any, tower: str) -> tuple[int, int]:
    """(blocks with frozen weight matrices, blocks whose weight matrices train) of ``tower`` whose
    activations a backward pass through ``model`` (a VideoTextModel, on any device, meta included)
    keeps: every block from the first that needs a gradient, which is the earlier of the method's own
    entry point (``model.grad_start(tower)``) and the first CLIP block with a trainable tensor."""
    blocks = list(model.clip.blocks(tower))
    first = model.grad_start(tower)
    heavy_from = None
    for i, blk in enumerate(blocks):
        params = [p for p in blk.parameters() if p.requires_grad]
        if params and (first is None or i < first):
            first = i
        if heavy_from is None and any(p.ndim >= 2 for p in params):
            heavy_from = i
    if first is None:
        return 0, 0
    training = len(blocks) - heavy_from if heavy_from is not None else 0
    return len(blocks) - first - training, training


def estimate_model_step(model: Any, *, batch: int, frames: int, image_size: int, text_tokens: int,
                        grad_checkpointing: bool = False, amp: bool = False) -> dict[str, Any]:
    """:func:`estimate_train_step` for a built model (a meta-device build costs nothing): its parameter
    counts, prompt tokens and which blocks keep activations."""
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return estimate_train_step(
        model.clip.cfg, parameters=parameters, trainable=trainable, batch=batch, frames=frames, image_size=image_size,
        text_tokens=text_tokens, video_prompts=model.video_prompt_tokens, text_prompts=model.text_prompt_tokens,
        kept={tower: kept_blocks(model, tower) for tower in ("visual", "text")}, grad_checkpointing=grad_checkpointing,
        amp=amp)
