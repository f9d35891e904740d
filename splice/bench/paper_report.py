"""The paper protocol's report: ``results.md`` with the transductive rows in a table of their
own (never mixed into the main one), plus ``results.json`` and ``results.png``.

Tables: (1) the references and every single dense merged model fitted without test data;
(2) merges that are not one dense model (EMR: a rebuilt model per task; WEMoE: routed blocks),
with their extra parameters and evaluation time against the dense model; (3) the
transductive rows, fitted on the unlabeled test inputs, each labelled "(transductive)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splice.bench.report import _plot, _table, summarize, write_files

__all__ = ["paper_markdown", "print_paper_table", "write_paper_report"]

SECTIONS = (
    (("reference", "merge"), "One merged model (validation data only)"),
    (("per-task", "routed"), "Not one dense model (inductive)"),
    (("transductive",), "Transductive: fitted on the unlabeled test inputs (not comparable)"),
)


def _sections(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    header, body = _table(results)
    kinds = [r["kind"] for r in summarize(results)]
    keys = [r["key"] for r in summarize(results)]
    extra = results.get("extra", {})
    out = []
    for want, title in SECTIONS:
        rows = [(row, k) for row, kind, k in zip(body, kinds, keys, strict=True) if kind in want]
        if not rows:
            continue
        head = list(header)
        if want != SECTIONS[0][0]:
            head += ["extra params", "eval time ×"]
            cells = []
            for row, k in rows:
                e = extra.get(k, {})
                more = [f"{e['extra_params']:,.0f}" if "extra_params" in e else "0",
                        f"{e['eval_time_x']:.2f}" if "eval_time_x" in e else "1.00"]  # fmt: skip
                cells.append([*row, *more])
        else:
            cells = [row for row, _ in rows]
        out.append((title, head, cells))
    return out


def paper_markdown(results: dict[str, Any]) -> str:
    cfg, meta = results["config"], results["meta"]
    train = cfg["train"]
    lines = [
        "# splice bench --protocol paper",
        "",
        f"Tasks: {', '.join(results['tasks'])}. Fine-tuning: {train['finetune']}, "
        f"{train['steps']} steps, batch {train['batch_size']}"
        + (f" (per task: {cfg['per_task']})" if cfg.get("per_task") else "")
        + f"; seeds {list(cfg['seeds'])}; caps train/val/test {list(cfg['caps'])}. "
        f"Wall time {meta['wall_s']:.0f} s (estimate {meta['estimate_s']:.0f} s; "
        f"{meta['threads']} threads, {meta['device']}).",
        "",
        "Accuracy (%) on each task's test split, each task with its own head. avg norm. = mean "
        f"over tasks of merged / fine-tuned accuracy (%). λ={cfg['fixed_lambda']}: "
        'FusionBench\'s fixed value; "· λ val": chosen on the validation splits.',
    ]
    for title, head, cells in _sections(results):
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]  # fmt: skip
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", *(f"Not run: {k} — {why}." for k, why in results.get("skipped", {}).items())]
    return "\n".join(lines) + "\n"


def print_paper_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for title, head, cells in _sections(results):
        table = Table(title=title)
        for i, h in enumerate(head):
            if i == 0:
                table.add_column(h, min_width=16, overflow="fold")
            else:
                table.add_column(h.replace("_", "_\n"), justify="right", no_wrap=True)
        for row in cells:
            table.add_row(*row)
        console.print(table)
    for label, why in results.get("skipped", {}).items():
        console.print(f"[dim]not run: {label} — {why}[/]")


def write_paper_report(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json (with the summary), results.md and results.png into ``out``."""
    return write_files(results, out, summarize, paper_markdown, _plot)
