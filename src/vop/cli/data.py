"""`vop data ...` commands (verify, cache, synth)."""
from __future__ import annotations

import typer

data_app = typer.Typer(help="Datasets: verify, cache frames, generate the synthetic world.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
