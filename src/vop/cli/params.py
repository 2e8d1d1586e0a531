"""`vop params`: trainable parameters of every method, from the architecture alone (no weights)."""
from __future__ import annotations

import json
from typing import Optional

import typer


_COUNTS = ("trainable", "percent", "paper_count", "uncounted", "inert", "backbone")


def params_table(backbone, frames: int) -> list[dict]:
    """One row per method; ``backbone`` is an architecture name or a CLIPConfig.

    Every row has ``plugin`` (the entry point of a third-party method, else ``None``), ``broken``
    (``None``, or why a plugin is left out: its method failed to build, or the plugin failed to import;
    such rows have ``None`` counts, and ``method`` is ``None`` for a plugin that registered nothing) and
    ``unsupported`` (``None``, or why the method does not run on this backbone, e.g. DGL on PE-Core's
    attention-pool read-out; such rows have ``None`` counts)."""
    from vop.backbone.config import get_arch
    from vop.methods import broken_plugins, count_parameters, get_method, list_methods, plugin_of
    from vop.errors import VopError
    from vop.methods.registry import describe_error

    cfg = get_arch(backbone) if isinstance(backbone, str) else backbone
    rows, broken = [], []
    for method in list_methods():
        plugin = plugin_of(method)
        why = get_method(method).unsupported_backbone(cfg)
        if why is not None:
            broken.append({"method": method, **dict.fromkeys(_COUNTS), "plugin": plugin, "broken": None,
                           "unsupported": why})
            continue
        try:
            c = count_parameters(method, backbone, frames=frames)
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a third-party method that fails to build is listed, not fatal
            if plugin is None:
                raise  # vop's own methods: a ConfigError (frames ...) is the user's, anything else a bug in vop
            why = str(e) if isinstance(e, VopError) else describe_error(e)
            broken.append({"method": method, **dict.fromkeys(_COUNTS), "plugin": plugin, "broken": why,
                           "unsupported": None})
            continue
        rows.append({
            "method": method,
            "trainable": c["trainable"],
            "percent": 100.0 * c["trainable"] / c["backbone"],
            "paper_count": c["counted"],
            "uncounted": c["uncounted"],
            "inert": c["inert"],
            "backbone": c["backbone"],
            "plugin": plugin,
            "broken": None,
            "unsupported": None,
        })
    for ep, err in broken_plugins().items():
        broken.append({"method": None, **dict.fromkeys(_COUNTS), "plugin": ep, "broken": f"failed to import: {err}",
                       "unsupported": None})
    return rows + broken


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

    broken = [r for r in rows if r["broken"]]
    unsupported = [r for r in rows if r["unsupported"]]
    rows = [r for r in rows if not r["broken"] and not r["unsupported"]]
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
    for r in unsupported:  # a method that does not run on this backbone: named, with why
        console.print(f"Not on this backbone: {r['method']} ({r['unsupported']}).", markup=False, highlight=False,
                      soft_wrap=True)
    for r in broken:  # a third-party plugin that failed: named, left out, the rest listed
        what = f"method {r['method']!r} of the plugin {r['plugin']}" if r["method"] else f"the plugin {r['plugin']}"
        console.print(f"Left out, broken: {what} ({r['broken']}).", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("params")(params)
