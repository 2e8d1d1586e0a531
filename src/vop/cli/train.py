"""`vop train` and `vop eval`."""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import typer

from vop.data.formats import format_names


def train_cmd(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML run configuration (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: optim.lr=1e-3 model.options.ks=6 ..."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory exactly where it stopped."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a method on a dataset (one process, or one per GPU under torchrun).

    optim.lr / optim.backbone_lr left out are the rates the method declares (printed with their source and saved in the run's config.yaml); a value given wins."""
    from vop.engine.config import RunConfig, load_config
    from vop.engine.trainer import train
    from vop.errors import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if resume:
        if config or overrides:
            raise ConfigError("--resume continues a run with its saved config.yaml: give no --config or overrides")
        train(resume=resume, progress=not quiet)
        return
    cfg = load_config(RunConfig, config, list(overrides or []))
    train(cfg, progress=not quiet)


def eval_cmd(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Prompt checkpoint (.safetensors) written by vop train, or the authors' ModelScope model folder."),
    method: Optional[str] = typer.Option(None, "--method", help="Evaluate an untrained method instead (e.g. zeroshot)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP weights (default: the one recorded in the checkpoint)."),
    backbone_arch: Optional[str] = typer.Option(None, "--backbone-arch", help="Architecture of the --method backbone's weights (ViT-H-14 ...; default: the file's record or inferred)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer file of a backbone whose vocabulary vop does not ship (SigLIP: the tokenizer.json of its weights' folder; default: the one found there, or the one the checkpoint records)."),
    dataset: str = typer.Option(..., "--dataset", help=f"{format_names()}."),
    root: str = typer.Option(..., "--root", help="Dataset folder."),
    split: str = typer.Option("test", "--split"),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames per video (default: the checkpoint's)."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_words: int = typer.Option(32, "--max-words"),
    num_workers: int = typer.Option(2, "--num-workers"),
    device: str = typer.Option("auto", "--device"),
    postprocess: str = typer.Option("none", "--postprocess", help="none (the paper's protocol), dsl; labelled in the output."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics here."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Score the split even if some of its videos are missing or unreadable (every number is then marked partial)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate a checkpoint (or an untrained method) on a dataset split: t2v and v2t R@1/5/10, MdR, MnR.

    Refuses a split with missing or unreadable videos unless --allow-partial; the output says how many
    captions and videos of the split were scored."""
    import vop
    from vop.data import get_dataset
    from vop.engine.evaluate import coverage_line, evaluate
    from vop.errors import ConfigError
    from vop.methods.checkpoint import checkpoint_facts
    from vop.runtime import resolve_device

    if (checkpoint is None) == (method is None):
        raise ConfigError("give exactly one of --checkpoint or --method")
    if checkpoint and backbone_arch:
        raise ConfigError("--backbone-arch is for --method: a checkpoint records its backbone's architecture")
    from vop import limits

    limits.check_options(("--frames", frames, 1, limits.MAX_FRAMES, limits.WHY_FRAMES),
                         ("--image-size", image_size, 1, limits.MAX_IMAGE_SIZE, limits.WHY_IMAGE),
                         ("--batch-size", batch_size, 1, limits.MAX_BATCH, limits.WHY_BATCH),
                         ("--max-words", max_words, 3, limits.MAX_CONTEXT),
                         ("--num-workers", num_workers, 0, limits.MAX_WORKERS))
    if postprocess not in ("none", "dsl"):
        raise ConfigError(f"--postprocess must be none or dsl, got {postprocess!r} (QB-Norm needs training captions: "
                          "use eval.postprocess=qbnorm in a training config)")
    dev = resolve_device(device)
    if checkpoint and os.path.isdir(checkpoint):  # the authors' ModelScope folder: its backbone is inside
        model = vop.load_checkpoint(checkpoint, backbone)
    elif checkpoint:
        meta = vop.read_checkpoint_meta(checkpoint)
        bb = backbone or meta.get("backbone")
        if bb is None and not checkpoint_facts(checkpoint, meta).whole_model:
            raise ConfigError(f"{checkpoint}: records no backbone; pass --backbone")
        model = vop.load_checkpoint(checkpoint, bb, tokenizer=tokenizer)
    else:
        if backbone is None:
            raise ConfigError("--method needs --backbone")
        from vop.methods import resolve_backbone

        from vop.methods.base import private_backbone

        model = vop.create_model(method, private_backbone(resolve_backbone(backbone, arch=backbone_arch, tokenizer=tokenizer)),
                                 frames=frames or 12)
    # before any video is decoded: can this model take that many frames? (model.frames is never changed)
    frames = model.check_frames(frames, str(checkpoint or method))
    model.to(dev)
    size = image_size or model.clip.cfg.vision.image_size
    ds = get_dataset(dataset, root, split, frames=frames, size=size, train=False, preprocess=model.clip.preprocess)
    # a batch of decoded videos (and its normalised copy) must fit, before the first is decoded
    from vop.memory import check_fits

    videos = max(1, min(batch_size, len(ds)))
    check_fits(2 * 4 * videos * frames * 3 * size * size, dev, f"a batch of {videos} videos of {frames} frames at {size} px",
               "lower --batch-size, --frames or --image-size")
    out = evaluate(model, ds, batch_size=batch_size, device=dev, num_workers=num_workers, max_words=max_words,
                   postprocess=postprocess, progress=not quiet, allow_partial=allow_partial)
    m = out.metrics
    partial = m["partial"]
    result = {"checkpoint": checkpoint, "method": model.name, "dataset": dataset, "split": out.dataset.split or split,
              "frames": frames, **m, "left_out": out.dataset.dropped}
    if partial:  # next to every number, for whoever reads only one block
        result["t2v"], result["v2t"] = {**m["t2v"], "partial": True}, {**m["v2t"], "partial": True}
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    typer.echo(f"{model.name} on {dataset}/{result['split']}: {coverage_line(m)}"
               f"{'; post-processing: ' + postprocess if postprocess != 'none' else ''}")
    mark = " (partial)" if partial else ""
    for d in ("t2v", "v2t"):
        r = m[d]
        typer.echo(f"{d}  " + "  ".join(f"{k} {r[key]:.1f}{mark}" for k, key in
                                        (("R@1", "R1"), ("R@5", "R5"), ("R@10", "R10"), ("MdR", "MdR"), ("MnR", "MnR"))))


def register(app: typer.Typer) -> None:
    app.command("train", context_settings={"allow_extra_args": False})(train_cmd)
    app.command("eval")(eval_cmd)
