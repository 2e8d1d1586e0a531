"""A short training run of a method on the tiny backbone and the smoke world (4 frames, 32 px, one epoch of
batches of 8 accumulated over 2), shared by the method tests that train, evaluate and index a real run."""
from pathlib import Path


def train_tiny(world: Path, out: Path, method: str, *overrides: str):
    """``vop train`` in-process with the settings above plus ``overrides``: (out, the trainer's results)."""
    from vop.engine.config import RunConfig, load_config
    from vop.engine.trainer import train

    cfg = load_config(RunConfig, None, [
        f"data.root={world}", "data.dataset=collection", "model.backbone=tiny", f"model.method={method}",
        "model.frames=4", "model.image_size=32", "optim.batch_size=8", "optim.accumulate=2", "optim.epochs=1",
        "optim.lr=1e-2", "data.num_workers=0", "eval.batch_size=16", "eval.every_epoch=false", *overrides,
        f"out_dir={out}"])
    return out, train(cfg, progress=False)
