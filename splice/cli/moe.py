"""``splice moe``: assemble a Mixtral / Qwen2-MoE model from dense experts (mergekit-moe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command("moe")
def moe(
    recipe: Annotated[Path, typer.Argument(help="MoE recipe YAML (mergekit-moe's format).")],
    out: Annotated[Path, typer.Argument(help="Output model dir.")],
    allow_random: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-is-not-useful-without-training",
            help="Allow gate_mode: random (a router that must be trained).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Build a mixture-of-experts model: the base's attention, each expert's MLPs, routers
    initialized from prompts."""
    from splice.merge.moe import build_moe

    report = build_moe(recipe, out, allow_random=allow_random, force=force)
    if as_json:
        print_json(report)
    else:
        typer.echo(
            f"wrote {out}: {report['architecture']}, {report['experts']} experts "
            f"(+{report['shared_experts']} shared), gates {report['gate_mode']}, "
            f"{report['seconds']:.1f} s"
        )
