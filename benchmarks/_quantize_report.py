"""Tables and the figure of the quantization benchmarks, from their JSON stores (issue #28):
``benchmarks/quantize_accuracy.py --report [--plot PNG]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _quantize import samples_for, suite_tasks

__all__ = ["report"]

LABELS = {"fp32": "FP32", "rtn-w8": "RTN W8", "rtn-w4": "RTN W4",
          "torch-dynamic": "torch dynamic int8", "light-w4a8": "light W4A8",
          "advanced-w4a8": "advanced W4A8", "advanced-parallel-w4a8": "advanced W4A8 parallel",
          "light-w8": "light W8", "light-w4": "light W4"}  # fmt: skip


def _rows(args) -> dict[tuple[str, str], dict]:
    store = json.loads(args.store.read_text()) if args.store.is_file() else {}
    tail = lambda task: f"|n{samples_for(args, task)}|i{args.iters}|b{args.bias_steps}"  # noqa: E731
    return {(r["task"], r["row"]): r for k, r in store.items() if k.endswith(tail(r["task"]))}


def _order(row: str) -> tuple[int, float]:
    names = list(LABELS)
    if row.startswith(("ip-", "ipa-")):
        return len(names) + row.startswith("ipa-"), float(row.split("-")[1])
    return (names.index(row) if row in names else len(names) + 1), 0.0


def _suite(rows: dict, tasks: list[str]) -> list[dict]:
    """Per row: mean accuracy, mean drop from FP32 and mean size over the tasks it ran on."""
    tasks = [t for t in tasks if (t, "fp32") in rows]
    names = sorted({r for t, r in rows if t in tasks}, key=_order)
    out = []
    for name in names:
        done = [rows[t, name] for t in tasks if (t, name) in rows]
        scored = [r for r in done if "accuracy" in r]
        if not scored:
            least = max(r["unreachable"] for r in done)
            out.append({"row": name, "unreachable": least, "tasks": len(done)})
            continue
        acc = [r["accuracy"] for r in scored]
        drop = [rows[r["task"], "fp32"]["accuracy"] - r["accuracy"] for r in scored]
        out.append({
            "row": name, "tasks": len(scored), "accuracy": float(np.mean(acc)),
            "drop": float(np.mean(drop)), "worst_drop": float(np.max(drop)),
            "fraction": float(np.mean([r["fraction"] for r in scored])),
            "seconds": float(np.mean([r["calibration_s"] for r in scored])),
            "per_task": {r["task"]: r["accuracy"] for r in scored},
        })  # fmt: skip
    return out


def _label(s: dict, most: int) -> str:
    """A row's name, with its task count where it ran on fewer tasks than the suite's."""
    name = LABELS.get(s["row"], s["row"])
    return name if s["tasks"] >= most else f"{name} ({s['tasks']} tasks)"


def _print_suite(name: str, tasks: list[str], summary: list[dict]) -> None:
    if not summary:
        return
    most = max(s["tasks"] for s in summary)
    tasks = [t for t in tasks if any(t in s.get("per_task", {}) for s in summary)]
    print(f"\n{name} suite ({len(tasks)} tasks)\n")
    print("| row | size (of FP32) | mean acc | mean drop | worst drop | "
          + " | ".join(tasks) + " | calib s (mean) |")  # fmt: skip
    print("|---" * (6 + len(tasks)) + "|")
    for s in summary:
        if "unreachable" in s:
            print(f"| {s['row']} | unreachable (smallest {s['unreachable']:.3f}) |"
                  + " |" * (4 + len(tasks)))  # fmt: skip
            continue
        per = " | ".join(f"{100 * s['per_task'][t]:.1f}" if t in s["per_task"] else "–"
                         for t in tasks)  # fmt: skip
        print(f"| {_label(s, most)} | {s['fraction']:.3f} | "
              f"{100 * s['accuracy']:.1f} | {100 * s['drop']:+.1f} | {100 * s['worst_drop']:+.1f}"
              f" | {per} | {s['seconds']:.0f} |")  # fmt: skip


def _llm(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = list(json.loads(path.read_text()).values())
    print("\nSmolLM2-135M held-out perplexity\n\n| row | size (of FP32) | perplexity | calib s |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["fraction"]):
        print(f"| {r['label']} | {r['fraction']:.3f} | {r['perplexity']:.2f} | "
              f"{r['calibration_s']:.0f} |")  # fmt: skip
    return rows


def _plot(path: Path, suites: dict[str, list[dict]], llm: list[dict]) -> None:
    """Accuracy drop from FP32 (points) against size; a row far below the others is drawn at
    the top edge with its value written beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    panels = [(n, s) for n, s in suites.items() if s] + ([("SmolLM2", llm)] if llm else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    markers = dict(zip([*LABELS, "rtn-w4-e8", "advanced-w4"], "*osv^DPXh<>", strict=False))
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        if name == "SmolLM2":
            fp = next(r["perplexity"] for r in rows if r["row"] == "fp32")
            points = [(r["fraction"], r["perplexity"] / fp - 1, r["label"], r["row"])
                      for r in rows]  # fmt: skip
            ylabel, top, fmt = "held-out perplexity / FP32 − 1", 1.0, "{:+.0%}"
            title = f"SmolLM2-135M (FP32 perplexity {fp:.1f})"
        else:
            scored = [s for s in rows if "accuracy" in s]
            most = max(s["tasks"] for s in scored)
            points = [(s["fraction"], 100 * s["drop"], _label(s, most), s["row"])
                      for s in scored]  # fmt: skip
            ylabel, fmt = "mean accuracy drop from FP32 (points)", "{:+.1f}"
            top = min(6.0, max(2.0, max(p[1] for p in points) + 0.5))
            title = f"{name} suite ({most} tasks)"
        for x, y, label, row in points:
            if row.startswith(("ip-", "ipa-")):
                continue
            ax.scatter(x, min(y, top), label=label, marker=markers.get(row, "o"), s=55)
            if y > top:
                ax.annotate(fmt.format(y), (x, top), textcoords="offset points", xytext=(6, -4),
                            fontsize=8)  # fmt: skip
        for prefix, style, pipeline in (("ip-", "k.-", "light"), ("ipa-", "b.--", "advanced")):
            ip = sorted((p for p in points if p[3].startswith(prefix)), key=lambda p: p[0])
            if ip:
                ax.plot([p[0] for p in ip], [min(p[1], top) for p in ip], style,
                        label=f"integer program ({pipeline})")  # fmt: skip
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.13, 0.16, 0.19, 0.25, 0.5, 1.0]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.set_ylim(min(-0.1 * top, min(p[1] for p in points) - 0.05 * top), 1.08 * top)
        ax.set(xlabel="size (fraction of FP32)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nfigure: {path}")


def report(args) -> None:
    rows = _rows(args)
    suites = {}
    for name, spec in (("image", "image"), ("text", "text")):
        tasks = suite_tasks(spec)
        suites[f"{name} (EfficientNet-Lite0)" if name == "image" else f"{name} (MiniLM-L6)"] = (
            summary := _suite(rows, tasks)
        )
        _print_suite(name, tasks, summary)
    llm = _llm(args.llm_store)
    if args.plot is not None:
        _plot(args.plot, suites, llm)
