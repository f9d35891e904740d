"""On-screen summaries for ``splice merge``: the plan (``--plan``) and the outcome of a merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["print_outcome", "print_plan", "read_ledger"]


def read_ledger(out: str | Path) -> dict[str, Any]:
    """The summary parts of ``out/splice-ledger.json``: coverage, fidelity, vocab, adapter."""
    from splice.merge.output.ledger import LEDGER_NAME

    path = Path(out) / LEDGER_NAME
    ledger = json.loads(path.read_text())
    summary = {"path": str(path), "coverage": ledger["coverage"], "fidelity": ledger["fidelity"]}
    for key in ("vocab", "adapter"):
        if ledger.get(key):
            summary[key] = {k: v for k, v in ledger[key].items() if k not in ("tensors",)}
    summary["dropped"] = len(ledger["dropped"])
    return summary


def print_plan(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from splice.merge.engine.memory import MemoryPlan

    plan = dict(report["plan"])
    plan.pop("total_ram")
    mem = MemoryPlan(**plan)
    console = Console()
    t = report["tensors"]
    title = (
        f"[bold]{report['method']}[/] → {report['output']}: {t['merged']} tensors merged, "
        f"{t['copied']} copied, {t['dropped']} dropped — preflight passed in "
        f"{report['preflight_seconds']:.2f} s"
    )
    table = Table.grid(padding=(0, 2))
    for label, value in mem.lines():
        table.add_row(label, value)
    arch = report.get("architecture") or {}
    stacks = ", ".join(f"{k}.* ×{v}" for k, v in arch.get("stacks", {}).items()) or "none"
    table.add_row("architecture", f"{arch.get('model_type') or '?'}; layer stacks: {stacks}")
    if report.get("vocab"):
        v = report["vocab"]
        table.add_row(
            "vocab",
            f"{v['policy']}: {v['vocab_size']} rows (+{v['rows_added']} added, "
            f"{v['rows_dropped']} dropped, {v['rows_padded']} padded); tokenizer from "
            f"{v['tokenizer_from']}",
        )
    if report.get("untied"):
        table.add_row("tied heads", "stored untied: " + ", ".join(report["untied"]))
    console.print(title)
    console.print(table)


def print_outcome(out: Path, seconds: float, summary: dict[str, Any]) -> None:
    import typer

    fid = summary["fidelity"]
    typer.echo(f"wrote {out} in {seconds:.1f} s; ledger: {summary['path']}")
    inputs = summary["coverage"]
    total = sum(c["tensors"] for c in inputs.values())
    typer.echo(
        f"  ledger: {total} input tensors of {len(inputs)} inputs accounted for "
        f"({summary['dropped']} dropped)"
    )
    line = f"  fidelity: {fid['tensors_checked']} tensors finite"
    if fid.get("relative_change") is not None:
        worst = fid["max"]
        line += (
            f"; ‖θ−θ₀‖/‖θ₀‖ = {fid['relative_change']:.3g} overall, "
            f"max {worst['value']:.3g} ({worst['tensor']})"
        )
    typer.echo(line)
    logits = fid.get("logits")
    if logits and "max_abs_logit_diff" in logits:
        typer.echo(
            f"  logits ({logits['inputs']}): max |Δ| {logits['max_abs_logit_diff']:.3g} "
            f"({logits['relative']:.2g} relative)"
        )
    if "adapter" in summary:
        a = summary["adapter"]
        typer.echo(
            f"  adapter: rank {a['rank']}, {', '.join(a['factorization'])}; relative error "
            f"{a['relative_error_total']:.3g} total, max {a['relative_error_max']['value']:.3g}"
        )
    if "vocab" in summary:
        v = summary["vocab"]
        typer.echo(
            f"  vocab {v['policy']}: {v['vocab_size']} rows (+{v['rows_added']} added, "
            f"{v['rows_dropped']} dropped, {v['rows_padded']} padded), tokenizer from "
            f"{v['tokenizer_from']}; rows matched by index"
        )
