"""``splice fuse``: Transformer fusion with optimal transport of models from checkpoint files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command("fuse")
def fuse(
    models: Annotated[
        list[Path], typer.Argument(help="Two or more checkpoints (.safetensors file or model dir).")
    ],
    arch: Annotated[
        str,
        typer.Option(
            help="module:factory building the architecture (a dotted module or a .py path; a "
            "factory with one parameter receives the checkpoint's tensors, to read widths)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output dir (model.safetensors, splice-fuse.json).")],
    data: Annotated[
        Path | None,
        typer.Option(help="Unlabeled inputs for activation costs (.safetensors or .npy)."),
    ] = None,
    cost: Annotated[
        str | None,
        typer.Option(
            help="activations or weights (default: activations with --data, else weights)."
        ),
    ] = None,
    solver: Annotated[str, typer.Option(help="emd (exact) or sinkhorn.")] = "emd",
    reg: Annotated[float | None, typer.Option(help="Sinkhorn entropy weight.")] = None,
    anchor: Annotated[
        int, typer.Option(help="Index of the model whose widths the result has.")
    ] = 0,
    num_samples: Annotated[int, typer.Option(help="Inputs used for activation costs.")] = 200,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fuse models trained from different initialisations: align each to the anchor neuron by
    neuron with optimal transport, then average (docs/merging-fusion.md). Needs POT (the
    ``fusion`` extra)."""
    from splice.errors import UsageError

    if cost not in (None, "activations", "weights"):
        raise UsageError(f"--cost {cost!r}", fix="use activations or weights")
    if solver not in ("emd", "sinkhorn"):
        raise UsageError(f"--solver {solver!r}", fix="use emd or sinkhorn")
    if len(models) < 2:
        raise UsageError(f"fuse needs at least 2 models, got {len(models)}")
    from splice.io import CheckpointWriter
    from splice.merge.fusion._arch import build, load_factory, read_inputs, read_tensors
    from splice.merge.fusion.ot_fusion import ot_fuse

    factory = load_factory(arch)
    nets = [build(factory, read_tensors(p), str(p)) for p in models]
    inputs = read_inputs(data) if data is not None else None
    result = ot_fuse(
        nets,
        inputs,
        anchor=anchor,
        cost=cost or ("activations" if inputs is not None else "weights"),  # type: ignore[arg-type]
        solver=solver,  # type: ignore[arg-type]
        reg=reg,
        num_samples=num_samples,
    )
    report = {**result.info, "inputs": [str(p) for p in models], "arch": arch, "out": str(out)}
    with CheckpointWriter(out, force=force) as w:
        for name, tensor in result.model.state_dict().items():
            w.write(name, tensor.detach().contiguous())
        w.add_file("splice-fuse.json", json.dumps(report, indent=1))
    if as_json:
        print_json(report)
    else:
        typer.echo(
            f"wrote {out}: {len(models)} models fused onto model {anchor} "
            f"({report['cost']} costs, {solver}), {report['seconds']:.1f} s"
        )
