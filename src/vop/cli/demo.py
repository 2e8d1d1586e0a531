"""`vop demo`: the whole method on the embedded default, in minutes on a CPU."""
from __future__ import annotations

from typing import List, Optional

import typer


def demo(
    out: str = typer.Option("demo-out", "--out", help="Output folder (results.md, results.json, figure1.png, qualitative.html; "
                            "with --ablations: ablations.md, ablations.json, ablations.png)."),
    methods: Optional[List[str]] = typer.Option(None, "--methods", "-m", help="Methods to adapt (repeatable); default: full vop vop-p vop-f vop-fc."),
    all_methods: bool = typer.Option(False, "--all", help="Every method and baseline of the registry."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Training seeds per method (mean and spread reported); default 1, 3 with --ablations."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    smoke: bool = typer.Option(False, "--smoke", help="The same path at toy size (under a minute)."),
    backbone: str = typer.Option("tiny-clip", "--backbone", help="CLIP weights (default: the shipped tiny CLIP)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader worker processes."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (the tables do not depend on it)."),
    ablations: bool = typer.Option(False, "--ablations", help="The paper's ablations instead (uni-modal prompts, prompted "
                                   "depth, prompt length, VoP^F's K_s): ablations.md, ablations.json, ablations.png."),
) -> None:
    """Run the paper's comparison on the synthetic world and write a report."""
    import vop
    from vop.demo import DemoSettings, run_demo

    if ablations and (methods or all_methods):
        raise typer.BadParameter("--ablations runs its own set of models: leave out --methods / --all")
    kw: dict = {"backbone": backbone, "seeds": seeds if seeds is not None else (3 if ablations and not smoke else 1)}
    if all_methods:
        from vop.demo.run import reference_method

        reference = reference_method()  # the method that trains nothing: the demo's reference row already
        kw["methods"] = [m for m in vop.list_methods() if m != reference]
    elif methods:
        for m in methods:
            vop.methods.get_method(m)
        kw["methods"] = list(methods)
    if epochs is not None:
        kw["epochs"] = epochs
    if workers is not None:
        kw["num_workers"] = workers
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if smoke and ablations:  # 14 trainings: fewer frames and steps than the demo's smoke
        kw.update(frames=2, batch_size=16)
    settings = DemoSettings.smoke(**kw) if smoke else DemoSettings(**kw)
    if ablations:
        from vop.demo.ablations import run_ablations

        run_ablations(out, settings, progress=True, say=lambda m: typer.echo(m, err=False))
        return
    run_demo(out, settings, progress=True, say=lambda m: typer.echo(m, err=False))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
