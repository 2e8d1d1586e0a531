"""The `vop` command. Each command group is a small module registered here."""
from __future__ import annotations

import sys

import typer

from vop.errors import VopError

app = typer.Typer(
    name="vop",
    help="VoP: prompt tuning of CLIP for text-video retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from vop.cli import params as _params
    from vop.cli import data as _data
    from vop.cli import demo as _demo
    from vop.cli import pretrain as _pretrain
    from vop.cli import train as _train
    from vop.cli import search as _search

    _params.register(app)
    _data.register(app)
    _train.register(app)
    _search.register(app)
    _demo.register(app)
    _pretrain.register(app)


_register()


def _usage_errors() -> tuple[type, ...]:
    import click

    out: list[type] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException  # typer's own copy of click
        out.append(ClickException)
    except ImportError:
        pass
    return tuple(out)


def _aborts() -> tuple[type, ...]:
    import click

    return (click.exceptions.Abort, typer.Abort)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status: 0 success, 1 a check failed (``--strict``),
    2 a user error (VopError: one clear line, no traceback; or a usage error)."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except VopError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        return 2
    except typer.Exit as e:  # pragma: no cover - click returns it when standalone_mode=False
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # usage errors (click's, or those of the click that typer >= 0.2x vendors)
        if isinstance(e, _usage_errors()):
            e.show()
            return e.exit_code
        if isinstance(e, _aborts()):  # Ctrl-C at a prompt
            return 1
        raise
    # standalone_mode=False: click *returns* the code of a typer.Exit (e.g. `vop data verify --strict`)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
