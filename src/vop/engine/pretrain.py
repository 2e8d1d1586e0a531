"""Contrastive pretraining of a tiny CLIP on synthetic still images (it never sees a video).

The real towers and tokenizer (:mod:`vop.backbone`, OpenAI state-dict layout, CLIP BPE), trained as
CLIP was: symmetric InfoNCE over a batch of image-caption pairs with a learnable logit scale
(initialised at 1/0.07, clamped at 100), AdamW (betas 0.9/0.98, eps 1e-6, weight decay on weight
matrices only) and linear warmup + cosine decay. The data is an endless stream of fresh stills from
``make_stills(style="rich")`` (:mod:`vop.data.synth`): objects, colours, sizes, positions, and motion
words read from still cues. Step ``k`` uses stills ``k*B .. k*B+B-1`` of the seed's stream, so a run
is a pure function of its config: same config, same thread count, same machine -> bitwise-identical
weights.

Captions repeat within a batch ("a red circle moving left" twice): identical captions are treated as
positives of each other (the target distribution spreads over them), not as negatives.

See docs/pretrain.md for the shipped model (``vop.load_clip("tiny-clip")``) and how it was made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vop.backbone.checkpoint import build_clip
from vop.backbone.clip import CLIP
from vop.backbone.config import CLIPConfig, get_arch
from vop.backbone.tokenizer import CLIPTokenizer
from vop.data.synth import COLOURS, SHAPES, STILL_VERBS, VERBS, make_stills
from vop.data.transforms import Preprocess, normalize, resize_frames
from vop.errors import ConfigError

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "contrastive_loss", "still_batch", "encode_captions",
           "encode_stills", "encode_text_bucketed", "trim_tokens", "zero_shot_stills", "canonical_caption", "deterministic", "EVAL_SEED", "SHIPPED_NAME", "SHIPPED_ARCH"]

#: the still stream used for held-out evaluation (training streams use the run's ``seed``)
EVAL_SEED = 999_001
SHIPPED_NAME = "tiny-clip"
SHIPPED_ARCH = "tiny-synthetic"


@dataclass(frozen=True)
class PretrainConfig:
    arch: str | CLIPConfig = SHIPPED_ARCH
    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    seed: int = 0
    #: stills are drawn at this size (the synthetic videos' canvas) and resized to the model's input
    #: size exactly as video frames are (``resize_center_crop``)
    canvas: int = 64
    #: model input size; None: the architecture's
    image_size: int | None = None
    #: torch CPU threads during the run (a fixed count keeps the result independent of the machine's
    #: core count); None leaves the current setting
    threads: int | None = 2
    device: str = "cpu"
    #: encode captions in this many groups of similar length (see :func:`encode_text_bucketed`):
    #: less padding to compute, the same model up to float rounding (so not bitwise equal to a run
    #: with 1, which is how the shipped weights were made)
    text_buckets: int = 1

    def clip_config(self) -> CLIPConfig:
        cfg = get_arch(self.arch) if isinstance(self.arch, str) else self.arch
        if self.image_size is not None and self.image_size != cfg.vision.image_size:
            if self.image_size % cfg.vision.patch_size:
                raise ConfigError(f"image size {self.image_size} is not a multiple of the patch size "
                                  f"{cfg.vision.patch_size} of {self.arch if isinstance(self.arch, str) else 'the architecture'}")
            cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=self.image_size))
        return cfg


@dataclass
class PretrainResult:
    model: CLIP
    config: PretrainConfig
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@contextlib.contextmanager
def deterministic(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and a fixed CPU thread count for the duration of the block."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def still_images(images: np.ndarray, image_size: int, preprocess: Preprocess | None = None) -> torch.Tensor:
    """uint8 ``(N, S, S, 3)`` stills -> normalised float ``(N, 3, size, size)``, resized like video frames, as the
    backbone's ``preprocess`` says (None: CLIP's)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    x = resize_frames(x, image_size, preprocess)
    return normalize(x) if preprocess is None else normalize(x, preprocess.mean, preprocess.std)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns after the longest caption's [EOT].

    Exact for CLIP's text tower: it is causal and reads out at [EOT], so nothing after [EOT] changes
    the embedding; it only saves compute.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length]


def encode_text_bucketed(model: CLIP, tokens: torch.Tensor, buckets: int = 4) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed in ``buckets`` groups of similar length, each trimmed
    to its own longest caption: the same embeddings (see :func:`trim_tokens`) for less compute."""
    if buckets <= 1 or tokens.shape[0] < 2 * buckets:
        return model.encode_text(trim_tokens(tokens))
    lengths = tokens.argmax(dim=-1)
    order = torch.sort(lengths, stable=True).indices
    parts = [model.encode_text(trim_tokens(tokens[idx])) for idx in order.chunk(buckets)]
    out = torch.empty(tokens.shape[0], parts[0].shape[1], dtype=parts[0].dtype, device=parts[0].device)
    return out.index_copy(0, order, torch.cat(parts))


def still_batch(step: int, cfg: PretrainConfig, tokenizer: CLIPTokenizer, image_size: int,
                preprocess: Preprocess | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The ``step``-th training batch: (images, trimmed tokens, captions)."""
    images, captions = make_stills(cfg.batch_size, cfg.seed, cfg.canvas, style="rich", start=step * cfg.batch_size)
    return still_images(images, image_size, preprocess), trim_tokens(tokenizer(captions)), captions


# ---------------------------------------------------------------------------------------------
# loss and optimiser
# ---------------------------------------------------------------------------------------------
def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     captions: Sequence[str] | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss). With ``captions``, pairs whose captions are identical are
    positives of each other: each row's target spreads evenly over them (without duplicates this is
    exactly CLIP's cross-entropy with the diagonal as target)."""
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    n = logits.shape[0]
    if captions is None:
        target = torch.eye(n, device=logits.device)
    else:
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        lab = torch.tensor([ids[c] for c in captions], device=logits.device)
        target = (lab[:, None] == lab[None, :]).float()
        target = target / target.sum(dim=1, keepdim=True)  # symmetric, so rows and columns alike
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(target * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return (i2t + t2i) / 2


def _param_groups(model: CLIP, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig = PretrainConfig(), *, progress: bool = False,
             callback: Callable[[int, float, CLIP], None] | None = None) -> PretrainResult:
    """Train a CLIP of ``cfg.arch`` from a seeded random init on the seed's still stream.

    ``callback(step, loss, model)`` is called after every step. Returns the trained model (eval mode, on the
    CPU) and the per-step losses.
    """
    from vop.engine.optim import cosine_with_warmup

    clip_cfg = cfg.clip_config()
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ConfigError(f"pretraining needs steps >= 1 and batch size >= 2 (got {cfg.steps} and {cfg.batch_size})")
    device = torch.device(cfg.device)
    tokenizer = CLIPTokenizer(clip_cfg.text.context_length)
    losses: list[float] = []
    t0 = time.perf_counter()
    with deterministic(cfg.threads if device.type == "cpu" else None):
        model = build_clip(clip_cfg, seed=cfg.seed).to(device).train()
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        sched = cosine_with_warmup(opt, cfg.steps, min(cfg.warmup_steps, cfg.steps // 2))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, desc="pretrain", unit="step")
        ema = None
        # the next batch is drawn in a background thread while this one trains (a batch is a pure
        # function of its step, so this changes nothing but the wall time)
        pool = ThreadPoolExecutor(max_workers=1)
        fetch = lambda k: pool.submit(still_batch, k, cfg, tokenizer, clip_cfg.vision.image_size,  # noqa: E731
                                      clip_cfg.vision.preprocess)
        pending = fetch(0)
        try:
            for step in range(cfg.steps):
                images, tokens, captions = pending.result()
                if step + 1 < cfg.steps:
                    pending = fetch(step + 1)
                images, tokens = images.to(device), tokens.to(device)
                img, txt = model.encode_image(images), encode_text_bucketed(model, tokens, cfg.text_buckets)
                loss = contrastive_loss(img, txt, model.logit_scale, captions)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.clamp_logit_scale()
                value = float(loss.detach())
                losses.append(value)
                if not math.isfinite(value):
                    raise FloatingPointError(f"pretraining diverged at step {step} (loss {value}); lower --lr")
                if callback is not None:
                    callback(step, value, model)
                if bar is not None:
                    ema = value if ema is None else 0.95 * ema + 0.05 * value
                    bar.set_postfix(loss=f"{ema:.3f}", scale=f"{model.logit_scale.exp().item():.1f}",
                                    lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
                    bar.update(1)
        finally:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    model = model.eval().cpu()
    return PretrainResult(model, cfg, losses, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# zero-shot evaluation on held-out stills
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_stills(model: CLIP, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised embeddings of uint8 stills ``(N, S, S, 3)``."""
    size = model.cfg.vision.image_size
    out = [F.normalize(model.encode_image(still_images(images[i : i + batch_size], size, model.preprocess)), dim=-1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_captions(model: CLIP, captions: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised caption embeddings (padding trimmed, which does not change them)."""
    tok = CLIPTokenizer(model.cfg.text.context_length)
    out = [F.normalize(model.encode_text(trim_tokens(tok(list(captions[i : i + batch_size])))), dim=-1)
           for i in range(0, len(captions), batch_size)]
    return torch.cat(out)


_MOTION = ("move_left", "move_right", "move_up", "move_down", "grow", "shrink")


def _classify(img: torch.Tensor, prompts: list[list[str]], model: CLIP) -> torch.Tensor:
    """Argmax over classes; class k's text embedding is the mean of its prompts' (prompt ensembling)."""
    flat = [p for ps in prompts for p in ps]
    emb = encode_captions(model, flat).view(len(prompts), len(prompts[0]), -1).mean(dim=1)
    return (img @ F.normalize(emb, dim=-1).t()).argmax(dim=1)


def canonical_caption(meta: dict, table: dict = STILL_VERBS) -> str:
    """One fixed wording of everything a rich still shows (from its ``make_stills`` meta): sizes,
    colours, shapes, positions, cues, distractors; objects in a fixed order. ``table`` picks the verb
    form: :data:`STILL_VERBS` ("a red circle moving left") or :data:`VERBS` ("a red circle moves left").
    Faint objects read "a faint ..." whether appearing or disappearing (a still cannot tell)."""
    parts = []
    for o in sorted(meta["objects"], key=lambda o: SHAPES.index(o["shape"])):
        k = o["kind"]
        size = "" if k in ("grow", "shrink") else o["size"] + " "
        if k == "static":
            parts.append(f"a {size}{o['colour']} {o['shape']}" + (f" {o['position']}" if o["position"] else ""))
        elif k in ("appear", "disappear"):
            parts.append(f"a faint {size}{o['colour']} {o['shape']}")
        else:
            parts.append(f"a {size}{o['colour']} {o['shape']} " + table[k][0].format(c=o["new"]))
    return " and ".join(parts)


def _retrieval(img: torch.Tensor, model: CLIP, captions: list[str]) -> tuple[float, float, float, float, int]:
    """i2t and t2i top-1 (%) with chance levels among the distinct ``captions``."""
    distinct = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(distinct)}
    lab = torch.tensor([index[c] for c in captions])
    sim = img @ encode_captions(model, distinct).t()
    i2t = 100.0 * (sim.argmax(dim=1) == lab).float().mean().item()
    t2i = 100.0 * (lab[sim.argmax(dim=0)] == torch.arange(len(distinct))).float().mean().item()
    counts = torch.bincount(lab, minlength=len(distinct)).float()
    return i2t, 100.0 / len(distinct), t2i, 100.0 * (counts / len(captions)).mean().item(), len(distinct)


@torch.no_grad()
def zero_shot_stills(model: CLIP, n: int = 2000, *, seed: int = EVAL_SEED, canvas: int = 64,
                     threads: int | None = None) -> dict[str, float]:
    """Zero-shot accuracy (%) on ``n`` held-out rich stills (a stream the training never draws).

    - ``i2t_top1``: among the distinct canonical captions of the held-out stills
      (:func:`canonical_caption`, "a small red circle moving left and a small blue square"), the
      best-scoring one is the still's own; ``t2i_top1``: for each distinct canonical caption, the
      best-scoring still has exactly that caption. ``*_video``: the same with the video captions'
      verb forms ("a small red circle moves left"). ``*_raw``: with the stills' own (paraphrased)
      captions, where a paraphrase of the right content counts as wrong.
    - ``colour`` / ``shape``: single-object stills, CLIP-style zero-shot classification with prompt
      ensembles ("a red circle", "a red square", ... for *red*); 4 and 3 classes.
    - ``motion_still`` / ``motion_video``: single-object stills with a trail, inner rings or a halo;
      6 classes (left, right, up, down, grow, shrink) with the object's colour and shape given,
      phrased as stills are ("a red circle moving left") or as the video captions are ("a red
      circle moves left").
    ``*_chance`` are the matching chance levels.
    """
    model = model.eval()
    with deterministic(threads):
        images, captions, metas = make_stills(n, seed, canvas, style="rich", return_meta=True)
        img = encode_stills(model, images)
        out: dict[str, float] = {"stills": float(n)}
        for suffix, caps in (("", [canonical_caption(m) for m in metas]),
                             ("_video", [canonical_caption(m, VERBS) for m in metas]), ("_raw", captions)):
            i2t, i2t_chance, t2i, t2i_chance, distinct = _retrieval(img, model, caps)
            out.update({f"i2t_top1{suffix}": i2t, f"i2t_chance{suffix}": i2t_chance, f"t2i_top1{suffix}": t2i,
                        f"t2i_chance{suffix}": t2i_chance, f"distinct_captions{suffix}": float(distinct)})

        single = [i for i, m in enumerate(metas) if len(m["objects"]) == 1 and m["objects"][0]["kind"] != "turn"]
        colours, shapes = list(COLOURS), list(SHAPES)
        if single:
            sel = img[single]
            pred = _classify(sel, [[f"a {c} {s}" for s in shapes] for c in colours], model)
            truth = torch.tensor([colours.index(metas[i]["objects"][0]["colour"]) for i in single])
            out["colour"], out["colour_chance"] = 100.0 * (pred == truth).float().mean().item(), 100.0 / len(colours)
            pred = _classify(sel, [[f"a {c} {s}" for c in colours] for s in shapes], model)
            truth = torch.tensor([shapes.index(metas[i]["objects"][0]["shape"]) for i in single])
            out["shape"], out["shape_chance"] = 100.0 * (pred == truth).float().mean().item(), 100.0 / len(shapes)
        moving = [i for i in single if metas[i]["objects"][0]["kind"] in _MOTION]
        if moving:
            objs = [metas[i]["objects"][0] for i in moving]
            truth = torch.tensor([_MOTION.index(o["kind"]) for o in objs])
            combo = torch.tensor([colours.index(o["colour"]) * len(shapes) + shapes.index(o["shape"]) for o in objs])
            for key, table in (("motion_still", STILL_VERBS), ("motion_video", VERBS)):
                prompts = [f"a {c} {s} {table[k][0]}" for c in colours for s in shapes for k in _MOTION]
                emb = encode_captions(model, prompts).view(len(colours) * len(shapes), len(_MOTION), -1)
                scores = torch.einsum("nd,nkd->nk", img[moving], emb[combo])
                out[key] = 100.0 * (scores.argmax(dim=1) == truth).float().mean().item()
            out["motion_chance"] = 100.0 / len(_MOTION)
            out["motion_stills"] = float(len(moving))
    return out
