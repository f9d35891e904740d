"""The benchmark report: a rich table, ``results.md``, ``results.json`` and ``results.png``.

Accuracy is per task on its test split. *Normalized* accuracy is merged / individual accuracy
on the same task (spec merging.md §0), averaged over tasks; with several seeds every number is
the mean ± std over seeds of the per-seed value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "markdown_table",
    "print_table",
    "summarize",
    "timing",
    "to_markdown",
    "write_files",
    "write_report",
]


def _ms(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per row: per-task and average accuracy, average normalized accuracy (mean, std)."""
    tasks = list(results["tasks"])
    rows = results["rows"]
    ind = next(r for r in rows if r["key"] == "individual")["acc"]
    out = []
    for r in rows:
        acc = r["acc"]
        seeds = len(next(iter(acc.values())))
        avg = [np.mean([acc[t][s] for t in tasks]) for s in range(seeds)]
        norm = [np.mean([acc[t][s] / max(ind[t][s], 1e-9) for t in tasks]) for s in range(seeds)]
        out.append(
            {
                "key": r["key"],
                "label": r["label"],
                "kind": r["kind"],
                "acc": {t: _ms(acc[t]) for t in tasks},
                "avg_acc": _ms(avg),
                "avg_norm": _ms(norm),
                "merge_s": _ms(r["merge_s"]) if r["merge_s"] else None,
                "params": r["params"],
                "tuned": r.get("tuned"),
            }
        )
    return out


def _fmt(ms: tuple[float, float] | None, pct: bool = True, seeds: int = 1) -> str:
    if ms is None:
        return "–"
    m, s = ms
    k = 100.0 if pct else 1.0
    digits = 1 if pct else 3
    return f"{m * k:.{digits}f}" + (f" ± {s * k:.{digits}f}" if seeds > 1 else "")


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tasks = list(results["tasks"])
    seeds = len(results["config"]["seeds"])
    header = ["method", *tasks, "avg acc", "avg norm.", "merge s"]
    body = []
    for r in summarize(results):
        label = r["label"]
        if r.get("tuned"):
            label += "→" + ",".join(str(p[r["tuned"]]) for p in r["params"])
        body.append(
            [
                label,
                *(_fmt(r["acc"][t], seeds=seeds) for t in tasks),
                _fmt(r["avg_acc"], seeds=seeds),
                _fmt(r["avg_norm"], seeds=seeds),
                _fmt(r["merge_s"], pct=False, seeds=1),
            ]
        )
    return header, body


def markdown_table(results: dict[str, Any]) -> list[str]:
    """The results table as markdown lines, then a line per setting not run."""
    header, body = _table(results)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in body),
        "",
        *(f"Not run: {label} — {why}." for label, why in results.get("skipped", {}).items()),
    ]


def to_markdown(results: dict[str, Any]) -> str:
    cfg, meta = results["config"], results["meta"]
    tuned = any(r.get("tuned") for r in results["rows"])
    lines = [
        "# splice bench results",
        "",
        f"Tasks: {', '.join(results['tasks'])}. Fine-tuning: {cfg['train']['finetune']} "
        f"(r={cfg['train']['r']}), {cfg['train']['steps']} steps, batch "
        f"{cfg['train']['batch_size']}; seeds {list(cfg['seeds'])}; "
        f"caps train/val/test {list(cfg['caps'])}. {timing(meta)}",
        "",
        "Accuracy (%) on each task's test split, each task with its own head. "
        "avg norm. = mean over tasks of merged / individual accuracy (%)."
        + (' "· λ val→0.5": λ chosen on the validation splits (never test), per seed.' * tuned),
        "",
        *markdown_table(results),
    ]
    return "\n".join(lines) + "\n"


def timing(meta: dict[str, Any]) -> str:
    """``Wall time 137 s (estimate 130 s; 2 threads, cpu; load 3 s, train 94 s, …).`` plus the
    training speed (s per 100 steps per task: the number to compare machines by)."""
    phases = ("load", "train", "evaluate", "continual")
    parts = [f"{k} {meta[k + '_s']:.0f} s" for k in phases if meta.get(k + "_s") is not None]
    estimate = f"estimate {meta['estimate_s']:.0f} s; " if meta.get("estimate_s") else ""
    text = (
        f"Wall time {meta['wall_s']:.0f} s ({estimate}{meta['threads']} threads, "
        f"{meta['device']}; {', '.join(parts)})."
    )
    if meta.get("train_s_per_100_steps"):
        text += f" Training: {meta['train_s_per_100_steps']:.1f} s per 100 steps per task."
    return text


def print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    header, body = _table(results)
    table = Table(title=f"splice bench ({results['meta']['wall_s']:.0f} s)")
    for i, h in enumerate(header):
        # Numbers never wrap; long task names break at "_"; labels wrap in narrow terminals.
        if i == 0:
            table.add_column(h, min_width=16, overflow="fold")
        else:
            name = h.replace("_", "_\n").replace(" ", "\n")
            table.add_column(name, justify="right", no_wrap=True)
    kinds = [r["kind"] for r in summarize(results)]
    for row, kind in zip(body, kinds, strict=True):
        table.add_row(*row, style="dim" if kind == "reference" else None)
    console.print(table)
    for label, why in results.get("skipped", {}).items():
        console.print(f"[dim]not run: {label} — {why}[/]")


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    tasks = list(results["tasks"])
    cols = [*tasks, "avg"]
    grid = np.array([[r["acc"][t][0] for t in tasks] + [r["avg_acc"][0]] for r in summary])
    labels = [row[0] for row in _table(results)[1]]  # with the values chosen on val
    fig, (ax, bx) = plt.subplots(
        1,
        2,
        figsize=(4 + 1.1 * len(cols) + 4, 1.2 + 0.45 * len(labels)),
        gridspec_kw={"width_ratios": [len(cols), 3]},
    )
    im = ax.imshow(grid * 100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            color = "k" if grid[i, j] > grid.min() + 0.6 * np.ptp(grid) else "w"
            ax.text(j, i, f"{grid[i, j] * 100:.1f}", ha="center", va="center", color=color, size=8)
    ax.set_title("test accuracy (%)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    norm = [r["avg_norm"] for r in summary]
    bx.barh(
        range(len(labels)),
        [m * 100 for m, _ in norm],
        xerr=[s * 100 for _, s in norm],
        color=["grey" if r["kind"] == "reference" else "tab:blue" for r in summary],
    )
    bx.axvline(100, color="k", lw=0.8)
    bx.set_yticks(range(len(labels)), [])
    bx.set_ylim(len(labels) - 0.5, -0.5)  # rows line up with the heatmap's
    low = min(m for m, _ in norm) * 100
    bx.set_xlim(max(0.0, low - 10), max(102.0, max(m for m, _ in norm) * 100 + 2))
    for i, (m, _) in enumerate(norm):
        bx.text(m * 100, i, f" {m * 100:.1f}", va="center", size=8)
    bx.set_title("avg normalized accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_files(
    results: dict[str, Any],
    out: Path,
    summary: Callable[[dict[str, Any]], Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> list[Path]:
    """results.json (with ``summary``), results.md and results.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "results.png"]
    paths[0].write_text(json.dumps({**results, "summary": summary(results)}, indent=2))
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Write results.json, results.md and results.png into ``out``; returns the paths."""
    paths = write_files(results, out, summarize, to_markdown, _plot)
    if results.get("continual"):
        from splice.bench.continual import write_continual

        paths += write_continual(results["continual"], out)
    return paths
