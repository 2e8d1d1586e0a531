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


def main(argv: list[str] | None = None) -> int:
    """Console entry point. User errors (VopError) print one clear line and exit 2."""
    try:
        app(args=argv, standalone_mode=False)
    except VopError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        return 2
    except typer.Exit as e:  # pragma: no cover - typer internals
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
