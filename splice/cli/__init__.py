"""The ``splice`` command line: thin wrappers that parse options and call the library.

One module per command (see the loop below) registers it on
:data:`app`. Each command imports what it needs inside its body, so ``splice --help`` stays
fast. User errors (:class:`splice.errors.SpliceError`) print one line, no traceback, exit 1;
usage errors exit 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="splice",
    help="Adapt and compose pretrained models: adapters, merging, continual learning, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


@app.callback()
def _root() -> None:
    """splice: adapt and compose pretrained models."""


# Each command module registers its command on ``app``; this order is the order of ``--help``.
for _command in (
    "inspect",
    "bench",
    "train",
    "continual",
    "search",
    "merge",
    "extract",
    "moe",
    "evolve",
    "fuse",
    "quantize",
    "convert",
    "generate",
    "analyze",
):
    importlib.import_module(f"{__name__}.{_command}")


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    from splice.errors import SpliceError

    try:
        app()
    except SpliceError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted: nothing partial was left behind", err=True, fg="yellow")
        sys.exit(130)
