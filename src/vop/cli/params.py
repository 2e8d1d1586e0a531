"""`vop params`: trainable parameters of every method, from the architecture alone (no weights)."""
from __future__ import annotations

import json
from typing import Optional

import typer


def params_table(backbone, frames: int) -> list[dict]:
    """One row per method; ``backbone`` is an architecture name or a CLIPConfig."""
    from vop.methods import count_parameters, list_methods

    rows = []
    for method in list_methods():
        c = count_parameters(method, backbone, frames=frames)
        rows.append({
            "method": method,
            "trainable": c["trainable"],
            "percent": 100.0 * c["trainable"] / c["backbone"],
            "paper_count": c["counted"],
            "uncounted": c["uncounted"],
            "inert": c["inert"],
            "backbone": c["backbone"],
        })
    return rows


def params(
    backbone: str = typer.Option("ViT-B-32", "--backbone", "-b", help="Architecture name (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, tiny ...)."),
    frames: int = typer.Option(12, "--frames", "-f", help="Frames per video (matters for position-specific prompts)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    out: Optional[str] = typer.Option(None, "--out", help="Also write the JSON to this file."),
) -> None:
    """Trainable parameters of every method and their share of the backbone."""
    from vop import limits
    from vop.backbone.config import get_arch

    limits.check_options(("--frames", frames, 1, limits.MAX_FRAMES, limits.WHY_FRAMES))
    get_arch(backbone)  # clear error for an unknown name
    rows = params_table(backbone, frames)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Trainable parameters on {backbone}, {frames} frames (backbone: {rows[0]['backbone']:,})")
    table.add_column("method")
    table.add_column("trainable", justify="right")
    table.add_column("% of backbone", justify="right")
    table.add_column("as the paper counts", justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['trainable']:,}", f"{r['percent']:.3f}", f"{r['paper_count']:,}")
    console = Console()
    console.print(table)
    if any(r["uncounted"] for r in rows):
        console.print("The paper does not count VoP^F's frame position embedding "
                      f"({max(r['uncounted'] for r in rows):,} here); it is trainable and included on the left.")
    inert = [f"{r['method']} {r['inert']:,}" for r in rows if r["inert"]]
    if inert:
        console.print(f"Inert (trainable and included on the left, but provably never influencing the output): "
                      f"{', '.join(inert)}.")


def register(app: typer.Typer) -> None:
    app.command("params")(params)
