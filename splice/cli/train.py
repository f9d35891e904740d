"""``splice train``: fine-tune a model with an adapter (or in full)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def train(
    model: Annotated[Path, typer.Argument(help="Local Hugging Face model dir.")],
    data: Annotated[
        str, typer.Argument(help="CSV/JSONL file with text,label columns, or a bench task.")
    ],
    out: Annotated[Path, typer.Option(help="Output dir: adapter/ (or model/), metrics.json.")],
    method: Annotated[
        str,
        typer.Option(
            help="Adapter method (adalora, biadaptformer, bilora, dora, ept, houlsby, ia3, "
            "loha, lokr, lora, mam, mola, mos, nola, oft, parallel, prefix, prefix_nomlp, "
            "prompt, ptuning, querylora, ramt, sappa, scaled_parallel, sparse, vera), 'full', or"
            " 'head' (linear probe: only the new classification head trains)."
        ),
    ] = "lora",
    targets: Annotated[
        str | None, typer.Option(help="Comma-separated module suffixes (default: per model type).")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layer indices to adapt.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Method option key=value (JSON values), repeatable."),
    ] = None,
    objective: Annotated[str, typer.Option(help="auto, classification or causal-lm.")] = "auto",
    eval_data: Annotated[
        str | None, typer.Option(help="Eval file (default: hold out --eval-fraction).")
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(help="Share of the data held out for eval.")
    ] = 0.1,
    eval_split: Annotated[
        str,
        typer.Option(help="Bench task split to evaluate on: test, or val to choose settings."),
    ] = "test",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: --epochs).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the training data.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (5e-4 adapters, 5e-5 full).")
    ] = None,
    head_lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of the new head (default 5e-2; --method head: --lr)."
        ),
    ] = None,
    warmup: Annotated[float, typer.Option(help="Linear warmup, fraction of steps.")] = 0.06,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices.")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm; 0 disables.")] = 1.0,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 128,
    precision: Annotated[str, typer.Option(help="fp32 or bf16 (autocast).")] = "fp32",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: none).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of init, data order and dropout.")] = 0,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    format: Annotated[str, typer.Option(help="Adapter format: splice or peft.")] = "splice",
    select: Annotated[
        str | None,
        typer.Option(help="Choose where to tune first: spt (entries/LoRA), rdp (layers), id3."),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(help="--select budget: SPT parameters, RDP layers K, ID³ weight entries."),
    ] = None,
    select_set: Annotated[
        list[str] | None,
        typer.Option("--select-set", help="Selector option key=value (JSON values), repeatable."),
    ] = None,
    base_bits: Annotated[
        int | None,
        typer.Option(
            help="QLoRA: train on the base quantized to 2-8 bits (dequantized on the fly)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
) -> None:
    """Fine-tune a model with an adapter (or in full) on a text file or bench task."""
    import json

    import pydantic

    from splice.cli._options import parse_sets
    from splice.errors import UsageError
    from splice.train import TrainConfig
    from splice.train import train as run

    options = parse_sets(set_, "r=16")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        cfg = TrainConfig(
            model=model, data=data, out=out, method=method, adapter=options,
            targets=split(targets) if targets else None,
            layers=[int(i) for i in split(layers)] if layers else None,
            objective=objective, eval_data=eval_data, eval_fraction=eval_fraction,
            eval_split=eval_split, steps=steps, epochs=epochs, batch_size=batch_size,
            grad_accum=grad_accum, lr=lr, head_lr=head_lr, warmup=warmup,
            weight_decay=weight_decay, grad_clip=grad_clip, max_length=max_length,
            precision=precision, checkpoint_every=checkpoint_every, resume=resume, seed=seed,
            device=device, format=format, progress=not as_json, select=select, budget=budget,
            select_options=parse_sets(select_set, "eps=0.1", "--select-set"),
            base_bits=base_bits,
        )  # fmt: skip
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        option = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""
        raise UsageError(option + err["msg"].removeprefix("Value error, ")) from None
    try:
        metrics = run(cfg)
    except KeyboardInterrupt:
        if checkpoint_every:
            typer.secho(
                f"the last checkpoint is in {out / 'checkpoint'}; rerun with --resume", err=True
            )
        raise
    if not metrics:  # a non-zero rank under torchrun: rank 0 reports
        return
    for warning in metrics["warnings"]:
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    if as_json:
        print_json(metrics)
    else:
        ev = metrics["eval"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float))
        if metrics.get("selection"):
            typer.echo(f"selection: {json.dumps(metrics['selection'])}")
        typer.echo(f"eval: {shown}; wrote {out}")
