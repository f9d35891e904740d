"""``splice evolve``: CMA-ES search over a recipe's merge parameters (mergekit-evolve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command("evolve")
def evolve(
    genome: Annotated[Path, typer.Argument(help="Genome YAML: the recipe and what to search.")],
    storage: Annotated[Path, typer.Argument(help="Study dir (rerun the same command to resume).")],
    scorer: Annotated[
        str | None,
        typer.Option(help="Fitness: module:function or file.py:function, model dir -> float."),
    ] = None,
    bench: Annotated[
        str | None,
        typer.Option(
            help="Fitness: mean validation accuracy on bench text tasks (a profile such as "
            "quick, or task names/files, comma-separated); their fine-tunes are written to "
            "STORAGE/models for the recipe to merge."
        ),
    ] = None,
    bench_model: Annotated[
        str, typer.Option(help="--bench: the text backbone, 'minilm' or a BERT-style dir.")
    ] = "minilm",
    bench_steps: Annotated[
        int | None, typer.Option(help="--bench: fine-tuning steps per task.")
    ] = None,
    executor: Annotated[str, typer.Option(help="ray (default) or local.")] = "ray",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray).")
    ] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="Ray CPUs per trial.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Search a recipe's merge parameters by CMA-ES; writes STORAGE/best.yml."""
    from splice.errors import UsageError
    from splice.merge.evolve import evolve as run

    if (scorer is None) == (bench is None):
        raise UsageError("give exactly one of --scorer and --bench", fix="see --help")
    fitness: object = scorer
    if bench is not None:
        from splice.bench.fitness import BenchFitness

        settings: dict[str, object] = {"text_model": bench_model}
        if bench_steps is not None:
            settings["train"] = {"steps": bench_steps}
        fitness = BenchFitness.of(bench, **settings)
        dirs = fitness.prepare(storage / "models", log=None if as_json else typer.echo)
        if not as_json:
            typer.echo("models: " + ", ".join(str(d) for d in dirs.values()))

    def row(r: dict) -> None:
        if as_json:
            return
        values = " ".join(f"{k}={v:.4g}" for k, v in r["params"].items())
        fit = "failed: " + r["error"] if r["fitness"] is None else f"{r['fitness']:.5g}"
        typer.echo(f"trial {r['trial']:4d} | {values} | fitness {fit} | best {r['best']:.5g}")

    summary = run(
        genome,
        storage,
        fitness,  # type: ignore[arg-type]
        executor=executor,
        address=address,
        cpus_per_trial=cpus_per_trial,
        progress=row,
    )
    if as_json:
        print_json(summary)
    else:
        typer.echo(
            f"{summary['completed']} trials ({summary['failed']} failed); best fitness "
            f"{summary['best_fitness']:.5g}; recipe: {summary['best_recipe']}"
        )
