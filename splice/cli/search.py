"""``splice search``: AutoPEFT configuration search, resumable, writing the Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def search(
    model: Annotated[Path, typer.Argument(help="Local Hugging Face model dir.")],
    data: Annotated[str, typer.Argument(help="CSV/JSONL file (text,label) or a bench task.")],
    study: Annotated[
        Path, typer.Option(help="Study dir: study.db (resumable), trials/, front.md/json/png/sh.")
    ],
    trials: Annotated[int, typer.Option(help="Trials in the study, finished ones included.")] = 30,
    minutes: Annotated[
        float | None, typer.Option(help="Stop starting trials after this many minutes.")
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps per trial.")] = 60,
    batch_size: Annotated[int, typer.Option(help="Examples per batch.")] = 16,
    lr: Annotated[float | None, typer.Option(help="Adapter learning rate (default 5e-4).")] = None,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 64,
    space: Annotated[
        str,
        typer.Option(
            help="Search space: sappa (serial/parallel/prefix sizes × per-layer leave-out, the "
            "paper's) or lora (LoRA rank × module groups × layers)."
        ),
    ] = "sappa",
    max_log2_rank: Annotated[int, typer.Option(help="Largest LoRA rank is 2^this (lora).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of every trial.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Search PEFT configurations for accuracy vs parameter share (AutoPEFT with Optuna): the
    paper's serial/parallel/prefix space or LoRA's; the hand configurations LoRA r=8 q,v and
    all-linear are the first trials. Rerun with the same --study to continue a stopped search."""
    from splice.errors import SpliceError
    from splice.train.search import run_search

    if trials < 1 or steps < 1:
        raise SpliceError(f"--trials {trials} and --steps {steps} must be ≥ 1")
    train = {"steps": steps, "batch_size": batch_size, "lr": lr, "max_length": max_length}
    report = run_search(
        model, data, study, trials=trials, minutes=minutes, train=train, seed=seed,
        max_log2_rank=max_log2_rank, space=space,
    )  # fmt: skip
    if as_json:
        print_json(report)
        return
    typer.echo((study / "front.md").read_text(), nl=False)
    for row in report["hand"]:
        by = row["dominated_by"]
        said = f"dominated by trial {', '.join(map(str, by))}" if by else "not dominated"
        typer.echo(f"hand trial {row['trial']} ({row['configuration']}): {said}")
    typer.echo(f"wrote {study}/front.md, front.json, front.png, front.sh")
