"""The LLM suite's report: a table (terminal or markdown) and ``llm-results.{json,md}``.

Columns: each task's score (constrained exact match where the task has labels, free exact
match otherwise), the averages of that score, of free-generation exact match and of the
answer log-likelihood (nats per token), and the normalized score (merged / individual, mean
over tasks). Values are means over seeds. A ``per-task`` row (EMR-Merging) is not one dense
model: each task is scored with its own rebuilt model, and its label gives the extra
parameters (masks and rescalers, in float32 parameters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["llm_table", "print_llm_table", "write_llm_report"]


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def llm_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the report, one row per reference or merge setting."""
    from splice.bench.llm import headline

    tasks = list(results["tasks"])
    rows = results["rows"]
    own = next(r for r in rows if r["key"] == "individual")["scores"]
    own_avg = {t: _mean([headline(s) for s in own[t]]) for t in tasks}
    header = ["setting", *tasks, "avg EM", "free EM", "loglik", "normalized"]
    body = []
    for r in rows:
        sc = r["scores"]
        task_em = {t: _mean([headline(s) for s in sc[t]]) for t in tasks}
        free = _mean([_mean([s["em"] for s in sc[t]]) for t in tasks])
        ll = _mean([_mean([s["loglik"] for s in sc[t]]) for t in tasks])
        ratios = [task_em[t] / own_avg[t] for t in tasks if own_avg[t] > 0]
        norm = f"{_mean(ratios):.1%}" if r["kind"] in ("merge", "per-task") and ratios else ""
        label = r["label"]
        if r.get("extra_params"):
            label += f" (+{r['extra_params'][-1] / 1e6:.2f} M mask params)"
        if r.get("params") and any(k in ("lambda",) for k in r["params"][-1]):
            label += f" (λ={r['params'][-1]['lambda']})"
        body.append(
            [label, *(f"{100 * task_em[t]:.1f}" for t in tasks),
             f"{100 * _mean(list(task_em.values())):.1f}", f"{100 * free:.1f}", f"{ll:.2f}", norm]
        )  # fmt: skip
    return header, body


def markdown(results: dict[str, Any]) -> str:
    header, body = llm_table(results)
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def print_llm_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    header, body = llm_table(results)
    table = Table(title=f"splice bench --suite llm ({results['meta']['wall_s']:.0f} s)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row, r in zip(body, results["rows"], strict=True):
        table.add_row(*row, style="dim" if r["kind"] == "reference" else None)
    console.print(table)
    for label, why in results.get("skipped", {}).items():
        console.print(f"[dim]not run: {label} — {why}[/]")
    if results.get("caveat"):
        console.print(f"[dim]note: {results['caveat']}[/]")


def write_llm_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``llm-results.json`` and ``llm-results.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "llm-results.json", out / "llm-results.md"
    js.write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    if results.get("skipped"):
        text += "\n\nNot run:\n" + "\n".join(f"- {k}: {v}" for k, v in results["skipped"].items())
    if results.get("caveat"):
        text += f"\n\nNote: {results['caveat']}."
    md.write_text(text + "\n")
    return [js, md]
