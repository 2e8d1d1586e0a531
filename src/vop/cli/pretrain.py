"""`vop pretrain`: train the tiny CLIP contrastively on synthetic stills (docs/pretrain.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_cmd)


MAX_STEPS = 10_000_000


def _check_memory(clip_cfg, batch_size: int) -> None:
    """Every CLIP weight trains on ``batch_size`` stills and captions a step: refuse a step that cannot fit."""
    from vop.backbone.config import parameter_count
    from vop.memory import check_fits, estimate_train_step

    n = parameter_count(clip_cfg)
    est = estimate_train_step(clip_cfg, parameters=n, trainable=n, batch=batch_size, frames=1,
                              image_size=clip_cfg.vision.image_size, text_tokens=clip_cfg.text.context_length,
                              kept={"visual": (0, clip_cfg.vision.layers), "text": (0, clip_cfg.text.layers)})
    check_fits(est["total"], "cpu", f"a pretraining step of {batch_size} stills", "lower --batch-size or --size")


def pretrain_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Weights file to write (.safetensors, OpenAI names)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the init and of the still stream (same seed: same weights)."),
    steps: int = typer.Option(1200, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Image-caption pairs per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warmup steps, then cosine decay to 0."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (weight matrices only)."),
    arch: str = typer.Option("tiny-synthetic", "--arch", "-a", help="Architecture name (src/vop/backbone/archs)."),
    size: Optional[int] = typer.Option(None, "--size", help="Model input size in px (default: the architecture's)."),
    canvas: int = typer.Option(64, "--canvas", help="Size the stills are drawn at (the synthetic videos' canvas)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads (fixed, so the weights do not depend on the core count)."),
    text_buckets: int = typer.Option(1, "--text-buckets", help="Encode captions in N length groups (less padding; "
                                     "changes float rounding, so not bitwise equal to the default 1)."),
    fp32: bool = typer.Option(False, "--fp32", help="Save float32 weights (default float16: half the file size)."),
    eval_stills: int = typer.Option(2000, "--eval-stills", help="Held-out stills for the zero-shot report (0: skip)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the run's numbers as JSON here."),
) -> None:
    """Pretrain a tiny CLIP on still images with captions (it never sees a video)."""
    import torch

    from vop.backbone.checkpoint import save_clip
    from vop.backbone.config import arch_name
    from vop.engine.pretrain import PretrainConfig, pretrain, zero_shot_stills
    from vop.errors import ConfigError

    from vop import limits

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    if not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")
    limits.check_options(("--seed", seed, 0, limits.INT64_MAX), ("--steps", steps, 1, MAX_STEPS),
                         ("--batch-size", batch_size, 2, limits.MAX_BATCH, "stills per step"), ("--lr", lr, 0, None),
                         ("--warmup", warmup, 0, MAX_STEPS), ("--weight-decay", weight_decay, 0, None),
                         ("--size", size, 1, limits.MAX_IMAGE_SIZE, limits.WHY_IMAGE),
                         ("--canvas", canvas, 1, limits.MAX_IMAGE_SIZE, limits.WHY_IMAGE),
                         ("--threads", threads, 1, limits.MAX_WORKERS), ("--text-buckets", text_buckets, 1, limits.MAX_BATCH),
                         ("--eval-stills", eval_stills, 0, limits.MAX_BATCH))
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(arch=arch, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup,
                         weight_decay=weight_decay, seed=seed, canvas=canvas, image_size=size, threads=threads,
                         text_buckets=text_buckets)
    clip_cfg = cfg.clip_config()  # clear errors before any work
    _check_memory(clip_cfg, batch_size)
    result = pretrain(cfg, progress=True)
    dtype = torch.float32 if fp32 else torch.float16
    save_clip(result.model, out, dtype=dtype)
    mb = out.stat().st_size / 1e6
    n_params = sum(p.numel() for p in result.model.parameters())
    tail = result.losses[-min(50, len(result.losses)):]
    typer.echo(f"{arch_name(clip_cfg) or arch}: {n_params:,} parameters, {steps} steps of {batch_size} stills in "
               f"{result.seconds:.0f} s; final loss {sum(tail) / len(tail):.3f}")
    typer.echo(f"wrote {out} ({mb:.1f} MB, {'fp32' if fp32 else 'fp16'})")
    numbers: dict = {"arch": arch_name(clip_cfg) or arch, "config": clip_cfg.to_dict(), "seed": seed, "steps": steps,
                     "batch_size": batch_size, "lr": lr, "warmup": warmup, "threads": threads,
                     "seconds": round(result.seconds, 1), "file_mb": round(mb, 2), "parameters": n_params,
                     "final_loss": sum(tail) / len(tail)}
    if eval_stills > 0:
        from vop.backbone.checkpoint import load_clip

        z = zero_shot_stills(load_clip(out), eval_stills, threads=threads)  # what was saved (fp16 included)
        numbers["zero_shot_stills"] = z
        typer.echo(f"zero-shot on {eval_stills} held-out stills: image->text top-1 {z['i2t_top1']:.1f}% "
                   f"(chance {z['i2t_chance']:.1f}), text->image top-1 {z['t2i_top1']:.1f}% "
                   f"(chance {z['t2i_chance']:.1f}); colour {z.get('colour', float('nan')):.1f}%, "
                   f"shape {z.get('shape', float('nan')):.1f}%, motion {z.get('motion_still', float('nan')):.1f}% "
                   f"('moving left') / {z.get('motion_video', float('nan')):.1f}% ('moves left')")
    if report is not None:
        report.write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
