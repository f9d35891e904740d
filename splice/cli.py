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
            help="Adapter method (lora, nola, mos, mola, ept), 'full', or 'head' (linear probe:"
            " only the new classification head trains)."
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
        float | None, typer.Option(help="Peak learning rate of the new head (default: --lr).")
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
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
) -> None:
    """Fine-tune a model with an adapter (or in full) on a text file or bench task."""
    import json

    import pydantic

    from splice.errors import UsageError
    from splice.train import TrainConfig
    from splice.train import train as run

    options = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r} is not key=value", fix="e.g. --set r=16")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
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
            device=device, format=format, progress=not as_json,
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
    if as_json:
        _print_json(metrics)
    else:
        ev = metrics["eval"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float))
        typer.echo(f"eval: {shown}; wrote {out}")


@app.command()
def merge(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe YAML (splice's or mergekit's format).")
    ] = None,
    out: Annotated[Path | None, typer.Argument(help="Output model dir.")] = None,
    list_: Annotated[
        bool,
        typer.Option(
            "--list",
            help="List merge methods (data-free, learned, continual) and their parameters.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Bytes per output shard.")] = "5GB",
    device: Annotated[str, typer.Option(help="Where the math runs: cpu or cuda.")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="Compute dtype (default float32; overrides the recipe).")
    ] = None,
    out_dtype: Annotated[
        str | None, typer.Option(help="Output dtype (default: the base's; overrides the recipe).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of stochastic methods (overrides the recipe).")
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Check the recipe and print the memory plan from headers only; write nothing.",
        ),
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(help="Refuse up front if the plan needs more RAM than this, e.g. 4GB."),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Merge what the inputs share: tensors some inputs lack are merged without "
            "them, extra ones dropped (the ledger records it).",
        ),
    ] = False,
    output: Annotated[
        str | None,
        typer.Option(help="'model' (default) or 'adapter': LoRA dirs in, one LoRA dir out."),
    ] = None,
    rank: Annotated[
        str | None, typer.Option(help="With --output adapter: LoRA rank N, or 'exact'.")
    ] = None,
    checksums: Annotated[
        bool,
        typer.Option(help="SHA-256 of every input and output file in the ledger (~1 s/GB)."),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Merge models and adapters from a recipe, streaming one tensor at a time."""
    from splice.errors import UsageError

    if list_:
        from splice.merge.recipe import method_table

        table = method_table()
        if as_json:
            _print_json(table)
        else:
            _print_methods(table)
        return
    if recipe is None or (out is None and not plan):
        raise UsageError("give a RECIPE and an OUT dir (or --list, or RECIPE --plan)")
    import time

    from splice.bench.learned_recipe import is_learned_recipe, run_recipe

    if is_learned_recipe(recipe):  # a `data:` section: docs/merging-learned.md
        progress = not as_json and sys.stderr.isatty()
        summary = run_recipe(recipe, out, device=device, force=force, progress=progress)
        if as_json:
            _print_json(summary)
        else:
            typer.echo(f"wrote {out} in {summary['seconds']:.1f} s")
        return
    options = {
        "max_shard_size": max_shard_size,
        "device": device,
        "dtype": dtype,
        "out_dtype": out_dtype,
        "seed": seed,
        "allow_missing": allow_missing,
        "max_memory": max_memory,
        "output": output,
        "rank": rank,
    }
    if plan:
        from splice.merge import plan_merge
        from splice.merge.report import print_plan

        report = plan_merge(recipe, **options)
        if as_json:
            _print_json(report)
        else:
            print_plan(report)
        return
    from splice.merge import merge as run
    from splice.merge.report import print_outcome, read_ledger

    start = time.perf_counter()
    progress = not as_json and sys.stderr.isatty()
    path = run(recipe, out, force=force, progress=progress, checksums=checksums, **options)
    seconds = time.perf_counter() - start
    ledger = read_ledger(path)
    if as_json:
        _print_json({"out": str(path), "seconds": round(seconds, 3), "ledger": ledger})
    else:
        print_outcome(path, seconds, ledger)


def _print_methods(table: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in table:
        kind = row["kind"] + (f", {row['data']} data" if row.get("data", "none") != "none" else "")
        t = Table(
            title=f"[bold]{row['name']}[/] ({kind}) — {row['pretty_name']}",
            caption=row["reference"],
            title_justify="left",
            caption_justify="left",
        )
        for col in ("parameter", "scope", "default", "description"):
            t.add_column(col)
        for p in row["params"]:
            default = "required" if p["required"] else repr(p["default"])
            t.add_row(p["name"], p["scope"], default, p["description"])
        console.print(t)


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
