"""``splice quantize``: post-training quantization (AdaQuant, IP mixed precision, BN and bias
tuning) of a model on a small calibration set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def quantize(
    model: Annotated[
        str, typer.Argument(help="efficientnet-lite0, minilm, or a Hugging Face model dir.")
    ],
    calib: Annotated[
        str, typer.Option(help="Calibration data: a bench task, or a CSV/JSONL text file.")
    ],
    out: Annotated[Path, typer.Option(help="Output dir (must not exist).")],
    bits: Annotated[int | None, typer.Option(help="Weight bits of every layer (2-8).")] = None,
    size: Annotated[
        float | None, typer.Option(help="Target size, fraction of FP32 (integer program).")
    ] = None,
    pipeline: Annotated[str, typer.Option(help="light (min/max) or advanced (AdaQuant).")] = (
        "advanced"
    ),
    a_bits: Annotated[int, typer.Option(help="Input (activation) bits; 0 keeps them float.")] = 8,
    options: Annotated[str, typer.Option(help="Bit options of the program, e.g. 4,8.")] = "4,8",
    ends_bits: Annotated[
        int, typer.Option(help="Bits of the first and last layer; 0: like the others.")
    ] = 8,
    mode: Annotated[str, typer.Option(help="AdaQuant mode: sequential or parallel.")] = (
        "sequential"
    ),
    iters: Annotated[int, typer.Option(help="AdaQuant steps per layer.")] = 1000,
    bias_steps: Annotated[int, typer.Option(help="Bias-tuning steps (advanced).")] = 600,
    samples: Annotated[int, typer.Option(help="Calibration samples.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Calibration samples per batch.")] = 50,
    max_length: Annotated[int, typer.Option(help="Tokens per text sample.")] = 32,
    image_size: Annotated[int, typer.Option(help="Image side for efficientnet-lite0.")] = 32,
    exclude: Annotated[
        str, typer.Option(help="Comma-separated layer names or suffixes kept float.")
    ] = "",
    seed: Annotated[int, typer.Option(help="Seed of AdaQuant's sample draws.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Quantize a model after training: integer weights + per-channel scales in safetensors."""
    import pydantic
    import torch

    from splice._schema import schema_error
    from splice.compress import AdaQuantConfig, QuantizeConfig
    from splice.errors import SpliceError
    from splice.train.quantize import load_calibration, load_model, quantize_model

    if out.exists():
        raise SpliceError("output exists", where=str(out), fix="pass a new --out dir")
    try:
        picks = tuple(int(b) for b in options.split(",") if b.strip())
    except ValueError:
        raise SpliceError(f"--options {options!r} is not a list of bits", fix="e.g. 4,8") from None
    try:
        cfg = QuantizeConfig(
            bits=bits, size=size, pipeline=pipeline, a_bits=a_bits or None, options=picks,
            ends_bits=ends_bits or None, mode=mode, bias_steps=bias_steps,
            adaquant=AdaQuantConfig(iters=iters, batch=batch_size, seed=seed),
            exclude=tuple(e.strip() for e in exclude.split(",") if e.strip()),
        )  # fmt: skip
    except pydantic.ValidationError as e:
        raise schema_error(e, prefix="--") from None
    torch.manual_seed(seed)
    cal = load_model(model, image_size=image_size)
    batches = load_calibration(cal, calib, samples, batch_size, max_length, seed)
    say = (lambda msg: None) if as_json else (lambda msg: typer.echo(msg, err=True))
    _, report = quantize_model(cal, batches, cfg, out, progress=say)
    if as_json:
        print_json(report.to_dict())
        return
    for layer in report.layers:
        typer.echo(f"{layer.name}\tW{layer.bits}" + (f"A{layer.a_bits}" if layer.a_bits else ""))
    losses = ", ".join(f"{k} {v:.4g}" for k, v in report.loss.items())
    typer.echo(
        f"size {report.bits / 8 / 2**20:.2f} MiB = {report.fraction:.3f} of FP32;"
        f" calibration loss: {losses}; {report.seconds:.0f} s; wrote {out}"
    )
