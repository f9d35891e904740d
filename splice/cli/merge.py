"""``splice merge``: merge models and adapters from a recipe (or list the methods)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._merge_print import print_outcome, print_plan, read_ledger
from splice.cli._printers import print_json, print_methods


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
    intermediates: Annotated[
        Path | None,
        typer.Option(help="Multi-document recipes: the dir for named stages' outputs."),
    ] = None,
    lazy: Annotated[
        bool,
        typer.Option(
            "--lazy", help="Multi-document recipes: reuse finished intermediates (same recipe)."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Merge models and adapters from a recipe, streaming one tensor at a time."""
    from splice.errors import UsageError

    if list_:
        from splice.merge.recipe import method_table

        table = method_table()
        if as_json:
            print_json(table)
        else:
            print_methods(table)
        return
    if recipe is None or (out is None and not plan):
        raise UsageError("give a RECIPE and an OUT dir (or --list, or RECIPE --plan)")
    from splice.merge.recipe.multi import is_multi

    if is_multi(recipe):  # mergekit-multi: named intermediates, run as a DAG
        from splice.merge.pipeline import merge_pipeline, plan_pipeline

        if plan:
            print_json(plan_pipeline(recipe, out, intermediates=intermediates, lazy=lazy))
            return
        done = merge_pipeline(
            recipe,
            out,
            intermediates=intermediates,
            lazy=lazy,
            force=force,
            checksums=checksums,
            device=device,
            max_shard_size=max_shard_size,
            dtype=dtype,
            out_dtype=out_dtype,
            seed=seed,
            allow_missing=allow_missing,
            max_memory=max_memory,
        )
        if as_json:
            print_json(done)
        else:
            typer.echo(
                f"ran {', '.join(done['ran']) or 'nothing'}; reused "
                f"{', '.join(done['reused']) or 'nothing'}"
            )
        return
    import time

    from splice.merge.recipe import is_learned_recipe

    if is_learned_recipe(recipe):  # a `data:` section: docs/merging-learned.md
        from splice.bench.learned_recipe import run_recipe

        progress = not as_json and sys.stderr.isatty()
        summary = run_recipe(recipe, out, device=device, force=force, progress=progress)
        if as_json:
            print_json(summary)
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

        report = plan_merge(recipe, **options)
        if as_json:
            print_json(report)
        else:
            print_plan(report)
        return
    from splice.merge import merge as run

    start = time.perf_counter()
    progress = not as_json and sys.stderr.isatty()
    path = run(recipe, out, force=force, progress=progress, checksums=checksums, **options)
    seconds = time.perf_counter() - start
    ledger = read_ledger(path)
    if as_json:
        print_json({"out": str(path), "seconds": round(seconds, 3), "ledger": ledger})
    else:
        print_outcome(path, seconds, ledger)
