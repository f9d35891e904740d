"""The continual view: OPCM vs continual task arithmetic as the tasks arrive one at a time.

After each task of a sequence, the merged model's mean test accuracy over the tasks seen so far
(each with its own head), for every continual method of :mod:`splice.merge.learned` among the
run's merge settings. Order matters (merging.md §10.6), so several orders are run: the
configured one, then seeded permutations. The individual experts' mean over the same tasks is
the upper reference. Writes ``continual.md`` and ``continual.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["continual_methods", "run_continual", "write_continual"]


def continual_methods(specs: Sequence[Any]) -> list[str]:
    """Names of the continual learned methods among the run's merge settings."""
    from splice.merge.learned import learned

    names = [s.method for s in specs if getattr(s, "learned", False)]
    return [n for n in dict.fromkeys(names) if learned.get(n).continual]


def run_continual(
    suite: Any, names: Sequence[str], orders: int, seed: int, individual: Mapping[str, float]
) -> list[dict[str, Any]]:
    """One record per (method, order): ``avg_seen[i]`` after the (i+1)-th task."""
    from splice.merge.learned import learned

    tasks = list(suite.data)
    kind = getattr(suite.encoder, "modality", "")
    rng = np.random.default_rng(seed)
    sequences = [tasks] + [
        [tasks[i] for i in rng.permutation(len(tasks))] for _ in range(orders - 1)
    ]
    out = []
    for order in sequences:
        upper = [float(np.mean([individual[t] for t in order[: i + 1]])) for i in range(len(order))]
        out.append({"method": "individual", "modality": kind, "seed": seed, "order": order,
                    "avg_seen": upper})  # fmt: skip
        for name in names:
            steps = learned.get(name).run(
                suite.encoder.module, [(t, suite.runs[t].deltas) for t in order]
            )
            curve, matrix = [], []
            for step in steps:
                acc = suite.acc(step.weights, tasks=order[: step.index + 1])
                curve.append(float(np.mean(list(acc.values()))))
                matrix.append([acc.get(t) for t in order])  # R[i][j]; None: not merged yet
            out.append({"method": name, "modality": kind, "seed": seed, "order": order,
                        "avg_seen": curve, "R": matrix})  # fmt: skip
    return out


def _curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """{modality: {method: (runs, tasks) array}} (modalities have different task counts)."""
    by: dict[str, dict[str, list[list[float]]]] = {}
    for r in records:
        by.setdefault(r.get("modality", ""), {}).setdefault(r["method"], []).append(r["avg_seen"])
    return {k: {m: np.asarray(v) for m, v in ms.items()} for k, ms in by.items()}


def to_markdown(records: Sequence[Mapping[str, Any]], title: str = "Continual merging") -> str:
    lines = [f"# {title}", ""]
    for kind, curves in _curves(records).items():
        runs, n = next(iter(curves.values())).shape
        lines += [
            f"{kind} tasks: mean test accuracy (%) over the tasks seen so far, after each of "
            f"{n} tasks; mean ± std over {runs} task orders × seeds.",
            "",
            "| method | " + " | ".join(f"after {i + 1}" for i in range(n)) + " |",
            "|---|" + "---:|" * n,
        ]
        for m, c in curves.items():
            cells = [f"{100 * c[:, i].mean():.1f} ± {100 * c[:, i].std():.1f}" for i in range(n)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_continual(
    records: Sequence[Mapping[str, Any]],
    out: Path,
    stem: str = "continual",
    title: str = "Continual merging",
    xlabel: str = "tasks merged so far",
) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.png`` (mean accuracy over the tasks seen so far, per
    method) into ``out``; returns the paths. The continual-training track
    (:mod:`splice.bench.continual_training`) writes its line plot here too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md, png = out / f"{stem}.md", out / f"{stem}.png"
    md.write_text(to_markdown(records, title))
    groups = _curves(records)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    for ax, (kind, curves) in zip(axes[0], groups.items(), strict=True):
        for m, c in curves.items():
            x = np.arange(1, c.shape[1] + 1)
            mean, std = 100 * c.mean(0), 100 * c.std(0)
            style = {"color": "grey", "ls": "--"} if m == "individual" else {}
            (line,) = ax.plot(x, mean, marker="o", label=m, **style)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
            ax.set_xticks(x)
        ax.set_title(f"{kind} tasks".strip())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean test accuracy over seen tasks (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, png]
