"""The PEFT track's report: a rich table, ``results.md``, ``results.json``, ``results.png``.

One table per backbone (suite): test accuracy per task and averaged over tasks (mean ± std
over seeds of the per-seed average), trainable parameters of the adapter and of the head
(mean over tasks: heads differ by class count), seconds per step and saved bytes (mean over
tasks), peak RSS (max over tasks) and the lr picked per task. The plot: per suite, average
accuracy against trainable parameters (adapter + head) on a log axis with the Pareto front
(no other row has fewer parameters and a higher accuracy), and the step time per row.
:func:`taxonomy_markdown` is the methods' taxonomy table of docs/adapters.md, from the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from splice.bench.report import _ms, write_files

__all__ = [
    "pareto",
    "print_peft_table",
    "summarize",
    "taxonomy_markdown",
    "to_markdown",
    "write_peft_report",
]


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (suite, row key), in run order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results["rows"]:
        groups.setdefault((r["suite"], r["key"]), []).append(r)
    out = []
    for (suite, key), rows in groups.items():
        first = rows[0]
        ok = [r for r in rows if r["status"] == "ok"]
        bad = next((r for r in rows if r["status"] != "ok"), None)
        entry: dict[str, Any] = {
            "suite": suite,
            "key": key,
            "label": first["label"],
            "kind": first["kind"],
            "family": first["family"],
            "acc": {r["task"]: _ms(r["acc"]) for r in ok},
            "lr": {r["task"]: r["lr"] for r in ok},
            "picked": {r["task"]: r["picked"] for r in ok if r.get("picked")},
            "note": None,
            "avg_acc": None,
            "budget": first.get("budget"),
            "options": first.get("options"),
        }
        if bad is not None:
            why = bad.get("reason") or bad.get("error")
            entry["note"] = ("n/a: " if bad["status"] == "n/a" else "error: ") + str(why)
        if ok and len(ok) == len(rows):
            per_seed = np.mean([r["acc"] for r in ok], axis=0)
            entry["avg_acc"] = _ms(list(per_seed))
        if ok:
            entry |= {
                "adapter_params": int(np.mean([r["adapter_params"] for r in ok])),
                "head_params": int(np.mean([r["head_params"] for r in ok])),
                "s_per_step": float(np.mean([r["s_per_step"] for r in ok])),
                "saved_bytes": int(np.mean([r["saved_bytes"] for r in ok])),
                "peak_rss_mb": max((r["peak_rss_mb"] or 0.0) for r in ok) or None,
            }
        out.append(entry)
    return out


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (parameters, accuracy) points no other point beats on both (fewer or
    equal parameters and higher accuracy, or fewer parameters and equal accuracy), by size."""
    front = []
    for i, (n, a) in enumerate(points):
        beaten = any(
            (m <= n and b > a) or (m < n and b >= a) for j, (m, b) in enumerate(points) if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _num(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _pct(ms: tuple[float, float] | None, seeds: int) -> str:
    if ms is None:
        return "–"
    return f"{100 * ms[0]:.1f}" + (f" ± {100 * ms[1]:.1f}" if seeds > 1 else "")


def _table(results: dict[str, Any], suite: str) -> tuple[list[str], list[list[str]]]:
    tasks = [t for t, v in results["tasks"].items() if _suite(v["modality"]) == suite]
    seeds = len(results["config"]["seeds"])
    header = ["method", "family", *tasks, "avg acc", "adapter params", "head params", "s/step"]
    header += ["peak RSS MB", "saved", "lr"]
    body = []
    for s in summarize(results):
        if s["suite"] != suite:
            continue
        label = s["label"]
        if s["budget"]:  # the sized knob, and whether the structure's floor stopped it
            knob = ", ".join(f"{k}={s['options'][k]}" for k in s["budget"]["knob"])
            label += f" ({knob}{', floor' if s['budget']['floor'] else ''})"
        row = [label, s["family"], *(_pct(s["acc"].get(t), seeds) for t in tasks)]
        row.append(_pct(s["avg_acc"], seeds))
        if "adapter_params" in s:
            rss = f"{s['peak_rss_mb']:.0f}" if s["peak_rss_mb"] else "–"
            row += [f"{s['adapter_params']:,}", f"{s['head_params']:,}", f"{s['s_per_step']:.3f}"]
            row += [rss, _num(s["saved_bytes"]) + "B", _lrs(s)]
        else:
            row += ["–"] * 6
        body.append(row)
    return header, body


def _lrs(s: dict[str, Any]) -> str:
    """Each task's picked lr, with the searched options picked with it (R-AMT's (init, τ))."""
    picked = s.get("picked") or {}
    return "/".join(
        f"{lr:g}" + "".join(f" {k} {x:g}" for k, x in picked.get(task, {}).items())
        for task, lr in s["lr"].items()
    )


def _suite(modality: str) -> str:
    return modality if modality in ("text", "llm") else "image"


def _suites(results: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["suite"] for r in results["rows"]))


def _front(results: dict[str, Any], suite: str) -> list[dict[str, Any]]:
    rows = [s for s in summarize(results) if s["suite"] == suite and s["avg_acc"]]
    pts = [(s["adapter_params"] + s["head_params"], s["avg_acc"][0]) for s in rows]
    return [rows[i] for i in pareto(pts)]


def _steps(cfg: dict[str, Any]) -> str:
    per = ", ".join(f"{k}: {v}" for k, v in (cfg.get("suite_steps") or {}).items())
    return f"{cfg['steps']} ({per})" if per else str(cfg["steps"])


def to_markdown(results: dict[str, Any]) -> str:
    cfg, meta = results["config"], results["meta"]
    budget = f" Budget: {cfg['budget']:,} adapter parameters per method." if cfg["budget"] else ""
    lines = [
        "# splice bench — PEFT track",
        "",
        f"Tasks: {', '.join(results['tasks'])}. {_steps(cfg)} steps of batch "
        f"{cfg['batch_size']}; seeds {list(cfg['seeds'])}; caps train/val/test "
        f"{list(cfg['caps'])}; lr grid {list(cfg['lr_grid'])}, full fine-tune "
        f"{list(cfg['full_lr_grid'])}, head (probe) {list(cfg['head_lr_grid'])}.{budget} "
        f"Wall time {meta['wall_s']:.0f} s (estimate {meta['estimate_s']:.0f} s; "
        f"{meta.get('workers', 1)} worker(s) of {meta['threads']} thread(s), {meta['device']}).",
        "",
        f"**Protocol.** {results['protocol']}",
        "",
        f"{results.get('metric', 'accuracy').capitalize()} (%) on each task's test split. "
        "Trainable parameters: the adapter's (unique "
        "tensors) and the head's, separately; s/step and saved bytes: mean over tasks; peak "
        "RSS: the process's peak during the picked run, max over tasks; lr: the pick per task.",
    ]
    for suite in _suites(results):
        header, body = _table(results, suite)
        lines += ["", f"## {suite}", ""]
        lines += ["| " + " | ".join(header) + " |"]
        lines += ["|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines += [""]
        notes = [s for s in summarize(results) if s["suite"] == suite and s["note"]]
        lines += [f"- {s['label']}: {s['note']}" for s in notes]
        front = " → ".join(s["label"] for s in _front(results, suite))
        lines += ["", f"Pareto front (avg accuracy vs trainable parameters): {front}."]
    return "\n".join(lines) + "\n"


def print_peft_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for suite in _suites(results):
        header, body = _table(results, suite)
        table = Table(title=f"splice bench — PEFT, {suite} ({results['meta']['wall_s']:.0f} s)")
        for i, h in enumerate(header):
            if i < 2:
                table.add_column(h, overflow="fold")
            else:
                table.add_column(h.replace("_", "_\n"), justify="right", no_wrap=True)
        for row in body:
            table.add_row(*row)
        console.print(table)
        for s in summarize(results):
            if s["suite"] == suite and s["note"]:
                console.print(f"[dim]{s['label']}: {s['note']}[/]", markup=True)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = _suites(results)
    fig, axes = plt.subplots(len(suites), 2, figsize=(12, 4.2 * len(suites)), squeeze=False)
    for (ax, bx), suite in zip(axes, suites, strict=True):
        rows = [s for s in summarize(results) if s["suite"] == suite and s["avg_acc"]]
        x = [s["adapter_params"] + s["head_params"] for s in rows]
        y = [100 * s["avg_acc"][0] for s in rows]
        colors = ["grey" if s["kind"] == "reference" else "tab:blue" for s in rows]
        ax.scatter(x, y, c=colors, zorder=3)
        for xi, yi, s in zip(x, y, rows, strict=True):
            ax.annotate(s["key"], (xi, yi), textcoords="offset points", xytext=(4, 4), size=8)
        front = pareto(list(zip(x, y, strict=True)))
        if front:
            fx = [x[i] for i in front]
            fy = [y[i] for i in front]
            ax.step(fx, fy, where="post", color="tab:red", lw=1, label="Pareto front", zorder=2)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (adapter + head)")
        ax.set_ylabel("test accuracy, avg over tasks (%)")
        ax.set_title(f"{suite}: accuracy vs trainable parameters")
        ax.grid(alpha=0.3)
        bx.barh(range(len(rows)), [s["s_per_step"] for s in rows], color=colors)
        bx.set_yticks(range(len(rows)), [s["key"] for s in rows])
        bx.invert_yaxis()
        bx.set_xlabel("seconds per optimizer step")
        bx.set_title(f"{suite}: step time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_peft_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Write results.json, results.md and results.png into ``out``; returns the paths."""
    return write_files(results, out, summarize, to_markdown, _plot)


def taxonomy_markdown() -> str:
    """The taxonomy table of docs/adapters.md: every registered method under its family."""
    from splice.adapters import METHODS
    from splice.adapters.layer import FAMILIES

    lines = [
        "| family | V-PEFT survey's name | registered methods |",
        "|---|---|---|",
    ]
    for family, vision in FAMILIES.items():
        names = [
            f"`{n}` ({cls.pretty_name})"
            for n, cls in METHODS.items()
            if getattr(cls, "family", None) == family
        ]
        lines.append(f"| {family} | {vision} | {', '.join(names) or '–'} |")
    return "\n".join(lines) + "\n"
