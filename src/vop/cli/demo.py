"""`vop demo`: the whole method on the embedded default, in minutes on a CPU."""
from __future__ import annotations

from typing import List, Optional

import typer


def demo(
    out: str = typer.Option("demo-out", "--out", help="Output folder (results.md, results.json, figure1.png, qualitative.html)."),
    methods: Optional[List[str]] = typer.Option(None, "--methods", "-m", help="Methods to adapt (repeatable); default: full vop vop-p vop-f vop-fc."),
    all_methods: bool = typer.Option(False, "--all", help="Every method and baseline of the registry."),
    seeds: int = typer.Option(1, "--seeds", help="Training seeds per method (mean and spread reported)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    smoke: bool = typer.Option(False, "--smoke", help="The same path at toy size (under a minute)."),
    backbone: str = typer.Option("tiny-clip", "--backbone", help="CLIP weights (default: the shipped tiny CLIP)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader worker processes."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (the tables do not depend on it)."),
) -> None:
    """Run the paper's comparison on the synthetic world and write a report."""
    import vop
    from vop.demo import DemoSettings, run_demo

    kw: dict = {"backbone": backbone, "seeds": seeds}
    if all_methods:
        kw["methods"] = [m for m in vop.list_methods() if m != "zeroshot"]
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
    settings = DemoSettings.smoke(**kw) if smoke else DemoSettings(**kw)
    run_demo(out, settings, progress=True, say=lambda m: typer.echo(m, err=False))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
