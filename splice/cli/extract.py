"""``splice extract-lora``: a full fine-tune minus its base, as a PEFT LoRA dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command("extract-lora")
def extract_lora(
    model: Annotated[Path, typer.Argument(help="The fine-tuned model dir.")],
    base: Annotated[Path, typer.Argument(help="The base model it was fine-tuned from.")],
    out: Annotated[Path, typer.Argument(help="Output PEFT LoRA dir.")],
    max_rank: Annotated[int, typer.Option(help="Largest LoRA rank per module.")] = 128,
    sv_epsilon: Annotated[
        float,
        typer.Option(
            help="Drop singular values at or below this (0: keep every direction up to --max-rank)."
        ),
    ] = 0.0,
    include: Annotated[
        list[str] | None, typer.Option("--include", "-i", help="Regex: only these modules.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", "-e", help="Regex: leave these modules out.")
    ] = None,
    save_module: Annotated[
        list[str] | None,
        typer.Option("--save-module", help="Module name saved at full rank (modules_to_save)."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Output dtype (default: the fine-tune's).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Extract a LoRA adapter from a full fine-tune by truncated SVD of each linear ΔW."""
    from splice.merge.extract import ExtractOptions
    from splice.merge.extract import extract_lora as run
    from splice.merge.recipe import parse_dtype

    opts = ExtractOptions(
        max_rank=max_rank,
        sv_epsilon=sv_epsilon,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        save_modules=tuple(save_module or ()),
        force=force,
        dtype=parse_dtype(dtype, "--dtype"),
    )
    report = run(model, base, out, opts)
    if as_json:
        print_json(report)
        return
    typer.echo(
        f"wrote {out}: rank {report['rank']}, {report['targets']} LoRA modules, "
        f"{len(report['modules_to_save'])} saved in full, max relative error "
        f"{report['relative_error_max']:.3g}, {report['seconds']:.1f} s"
    )
