"""``splice bench``: configure, run with progress, print and write the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def bench(
    full: Annotated[
        bool,
        typer.Option(
            "--full/--quick",
            help="Profile: --quick (default; 4 text tasks, 4 merge methods, ~2.5 min on the "
            "2-core dev box) or --full (6 text + 4 vision tasks, every method with its λ grid, "
            "longer training, 3 seeds).",
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
        str | None,
        typer.Option(
            help="Comma-separated merge methods, or 'all' (default: the profile's; --full: all)."
        ),
    ] = None,
    finetune: Annotated[
        str | None, typer.Option(help="'lora' (default), 'full', or another adapter name.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per task.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device, e.g. cpu or cuda.")] = None,
    text_model: Annotated[
        str | None,
        typer.Option(help="A local BERT-style model dir for the text tasks (default: MiniLM)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for results.*")] = Path("bench-out"),
    seed: Annotated[int | None, typer.Option(help="First training seed.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    continual: Annotated[
        bool,
        typer.Option(
            "--continual",
            help="Continual-training track instead: Share, iGSP, sequential LoRA, one LoRA per "
            "task, OPCM and continual TA on the task sequences (quick: 4 image tasks).",
        ),
    ] = False,
) -> None:
    """Fine-tune tasks from packaged data, merge them (--full: every registered way), report a
    table; an estimate first, then a line per phase with the time left."""
    profile = "full" if full else "quick"
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads slow
    # EfficientNet's many small ops 10-30x. Only effective before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console

    if continual:
        from splice.bench.continual_training import (
            configure_track,
            run_track,
            to_table,
            write_track,
        )

        track = configure_track(
            full, suite=suite, methods=_split(methods), steps=steps, seed=seed, device=device
        )
        err = Console(stderr=True)
        results = run_track(track, say=lambda line: err.print(line, soft_wrap=True))
        paths = write_track(results, out)
        if as_json:
            print_json(results)
        else:
            typer.echo(to_table(results))
        err.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)
        return
    from splice.bench.report import print_table, write_report
    from splice.bench.runner import configure, run_bench

    cfg = configure(
        profile,
        suite=suite,
        tasks=_split(tasks),
        methods=_split(methods),
        finetune=finetune,
        steps=steps,
        seed=seed,
        device=device,
        text_model=text_model,
    )
    err = Console(stderr=True)
    err.print(f"[bold]splice bench[/] {profile}: {', '.join(cfg.tasks)}", soft_wrap=True)
    results = run_bench(cfg, console=err)
    paths = write_report(results, out)
    if as_json:
        print_json(results)
    else:
        # Piped output (CI logs) gets a wide table rather than rich's 80 columns.
        print_table(results, Console() if sys.stdout.isatty() else Console(width=200))
    err.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)


def _split(csv: str | None) -> list[str] | None:
    return [x.strip() for x in csv.split(",") if x.strip()] if csv is not None else None
