"""``splice continual``: learn a sequence of tasks with Share, iGSP or a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def continual(
    tasks: Annotated[
        list[str],
        typer.Argument(
            help="The tasks in order: CSV/JSONL files (text,label), image folders, "
            "or packaged task names."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output dir: continual.json and state/.")],
    model: Annotated[
        str, typer.Option(help="Local BERT-style model dir, or 'minilm' (text tasks).")
    ] = "minilm",
    method: Annotated[
        str, typer.Option(help="share, igsp, sequential_lora or lora_per_task.")
    ] = "share",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Method option key=value (JSON values), repeatable."),
    ] = None,
    init: Annotated[
        list[Path] | None,
        typer.Option(
            help="Share: LoRA adapter dir/file to build the first subspace from "
            "(repeatable; same rank and targets)."
        ),
    ] = None,
    targets: Annotated[
        str | None, typer.Option(help="Comma-separated module suffixes (default: per model).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps per task.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    lr: Annotated[
        float | None, typer.Option(help="LR of the method's parameters (default per method).")
    ] = None,
    head_lr: Annotated[float, typer.Option(help="LR of each task's linear head.")] = 1e-2,
    max_length: Annotated[int, typer.Option(help="Tokens per example (text).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of init and data order.")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue OUT/state after its last finished task.")
    ] = False,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Train the tasks one after another on one backbone; write the accuracy matrix (row i:
    after task i, column j: task j), average accuracy, BWT, forgetting and stored parameters."""
    import json

    import pydantic

    from splice.cli._options import parse_sets
    from splice.errors import UsageError
    from splice.train.continual import ContinualConfig, load_sequence, run_sequence, seed_deltas

    options = parse_sets(set_, "k=16")
    try:
        cfg = ContinualConfig(
            method=method, options=options, steps=steps, batch_size=batch_size, lr=lr,
            head_lr=head_lr, seed=seed,
            targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
        )  # fmt: skip
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        option = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""
        raise UsageError(option + err["msg"]) from None
    encoder, data = load_sequence(model, tasks, max_len=max_length, device=device)

    def report(i: int, name: str, row: list, secs: float) -> None:
        if not as_json:
            seen = ", ".join(f"{data[j].name} {v:.1%}" for j, v in enumerate(row) if v is not None)
            typer.echo(f"task {i + 1}/{len(data)} {name} ({secs:.1f} s): {seen}", err=True)

    seeds = seed_deltas(encoder, init) if init else None
    run = run_sequence(encoder, data, cfg, out, resume=resume, on_task=report, seed_from=seeds)
    record = json.loads((out / "continual.json").read_text())
    if as_json:
        print_json(record)
        return
    m = record["metrics"]
    bwt = "n/a" if m["bwt"] is None else f"{100 * m['bwt']:+.1f} pts"
    typer.echo(
        f"{method}: average accuracy {m['final_avg_accuracy']:.1%}, BWT {bwt}, "
        f"stored {run.stored['params']:,} params ({run.stored['bytes']:,} B; heads "
        f"{run.stored['heads_params']:,}); wrote {out / 'continual.json'}"
    )
