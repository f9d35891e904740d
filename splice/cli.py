"""The ``splice`` command line: thin wrappers that parse options and call the library.

Each command imports what it needs inside its body, so ``splice --help`` stays fast.
User errors (:class:`splice.errors.SpliceError`) print one line, no traceback, exit 1;
usage errors exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="splice",
    help="Adapt and compose pretrained models: adapters, merging, continual learning, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root() -> None:
    """splice: adapt and compose pretrained models."""


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(help="Checkpoint: .safetensors file, HF model dir or PEFT adapter dir."),
    ],
    other: Annotated[
        Path | None, typer.Argument(help="Second checkpoint: report per-tensor differences.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read .bin/.pt files (weights_only=True).")
    ] = False,
) -> None:
    """Summarise a checkpoint or adapter (format, tensors, dtypes, shards, bytes), or diff two."""
    from splice.inspect import diff_report, print_diff, print_summary, summarize

    if other is None:
        summary = summarize(path, allow_pickle=allow_pickle)
        if as_json:
            _print_json(summary)
        else:
            print_summary(summary)
    else:
        report = diff_report(path, other, allow_pickle=allow_pickle)
        if as_json:
            _print_json(report)
        else:
            print_diff(report)


@app.command()
def bench(
    full: Annotated[
        bool,
        typer.Option(
            "--full/--quick",
            help="Profile: --quick (default; 4 text tasks, ~10 min on 2 cores) or --full "
            "(6 text + 4 vision tasks, longer training, 3 seeds).",
        ),
    ] = False,
    suite: Annotated[
        str | None, typer.Option(help="Task suite of the profile: text, vision or all.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated task names or paths (CSV/JSONL/image folder)."),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated merge methods (default: all registered).")
    ] = None,
    finetune: Annotated[
        str | None, typer.Option(help="'lora' (default), 'full', or another adapter name.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per task.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device, e.g. cpu or cuda.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for results.*")] = Path("bench-out"),
    seed: Annotated[int | None, typer.Option(help="First training seed.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Fine-tune tasks from packaged data, merge them every registered way, report a table."""
    from splice.bench.command import bench_command

    bench_command(
        "full" if full else "quick",
        suite=suite,
        tasks=tasks,
        methods=methods,
        finetune=finetune,
        steps=steps,
        device=device,
        out=out,
        seed=seed,
        as_json=as_json,
    )


def _print_json(obj: object) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


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
