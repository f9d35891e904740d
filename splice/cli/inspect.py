"""``splice inspect``: summarise one checkpoint, or report how two differ tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint: .safetensors file, HF model dir, PEFT adapter dir, or a splice "
            "adapter dir (loaded onto the base model it records, which checks it)."
        ),
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
    from splice.deltas.summary import diff_report, summarize

    if other is None and (path / "splice_adapter.json").is_file():
        summary = adapter_summary(path)  # loaded onto its base: every tensor is checked
        if as_json:
            print_json(summary)
        else:
            for key, value in summary.items():
                print(f"{key}: {value}")
    elif other is None:
        summary = summarize(path, allow_pickle=allow_pickle)
        if as_json:
            print_json(summary)
        else:
            print_summary(summary)
    else:
        report = diff_report(path, other, allow_pickle=allow_pickle)
        if as_json:
            print_json(report)
        else:
            print_diff(report)


def adapter_summary(path: Path) -> dict[str, Any]:
    """A splice adapter dir loaded onto the base model it records (packed masks and codes are
    checked against the weights): method, options, sites, trainable count and bytes."""
    import json

    from splice.adapters import adapter_layers, load_adapter, trainable_parameters

    info = json.loads((path / "splice_adapter.json").read_text())
    model = load_adapter(None, path)
    files = sorted(f for f in path.iterdir() if f.is_file())
    return {
        "path": str(path),
        "format": info.get("format"),
        "method": info["method"],
        "config": info["config"],
        "sites": len(adapter_layers(model)),
        "trainable": trainable_parameters(model).trainable,
        "bytes": sum(f.stat().st_size for f in files),
    }


def print_summary(s: dict[str, Any]) -> None:
    """The summary of one checkpoint: files, counts, size, config, then a table by dtype."""
    from rich.console import Console
    from rich.table import Table

    from splice.io import human_bytes, human_count

    console = Console()
    console.print(f"[bold]{s['path']}[/]  ({s['format']})")
    info = Table.grid(padding=(0, 2))
    info.add_row(
        "files",
        f"{len(s['files'])}: " + ", ".join(s["files"][:4]) + (" …" if len(s["files"]) > 4 else ""),
    )
    info.add_row("tensors", f"{s['tensors']:,}")
    info.add_row("parameters", f"{human_count(s['params'])} ({s['params']:,})")
    info.add_row("size", human_bytes(s["bytes"]))
    info.add_row("layers", str(s["layers"]))
    for k, v in s["config"].items():
        info.add_row(k, str(v))
    console.print(info)
    table = Table("dtype", "tensors", "parameters", title="by dtype")
    for dtype, d in s["dtypes"].items():
        table.add_row(dtype, f"{d['tensors']:,}", human_count(d["params"]))
    console.print(table)


def print_diff(r: dict[str, Any], top: int = 20) -> None:
    """The diff of two checkpoints: counts, change by layer, the ``top`` largest changes."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{r['a']}[/] → [bold]{r['b']}[/]")
    console.print(
        f"{r['compared']} tensors compared, {r['differing']} differ; "
        f"{len(r['only_in_a'])} only in first, {len(r['only_in_b'])} only in second, "
        f"{len(r['shape_mismatch'])} shape mismatches"
    )
    layers = Table("layer", "‖Δ‖/‖a‖", title="relative change by layer")
    for k, v in r["by_layer"].items():
        layers.add_row(k, f"{v:.3e}")
    console.print(layers)
    worst = sorted(r["tensors"], key=lambda x: -x["rel_diff"])[:top]
    table = Table("tensor", "‖Δ‖/‖a‖", "max |Δ|", title=f"largest changes (top {len(worst)})")
    for row in worst:
        table.add_row(row["name"], f"{row['rel_diff']:.3e}", f"{row['max_abs']:.3e}")
    console.print(table)
    for key, label in (("only_in_a", "only in first"), ("only_in_b", "only in second")):
        if r[key]:
            console.print(f"[yellow]{label}:[/] " + ", ".join(r[key][:10]))
    for m in r["shape_mismatch"][:10]:
        console.print(f"[red]shape mismatch:[/] {m['name']} {m['a']} vs {m['b']}")
