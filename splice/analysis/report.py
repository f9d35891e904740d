"""Write an analysis to its folder: ``report.json``, ``report.md`` and per-layer plots.

The folder is written atomically (:func:`splice.io.atomic_dir`): an interrupted or failed
analysis leaves nothing behind, and a finished one replaces the folder whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from splice.io import atomic_dir

__all__ = ["Progress", "markdown_table", "no_progress", "plot_layers", "write_report"]

Progress = Callable[[str, int], Callable[[], None]]
"""``progress(label, total)`` starts a bar and returns its ``advance()``."""


def no_progress(label: str, total: int) -> Callable[[], None]:
    """A :data:`Progress` that shows nothing."""
    return lambda: None


def _plain(obj: Any) -> Any:
    """JSON-safe: string keys, finite floats or null."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(
    out: str | Path,
    data: Mapping[str, Any],
    markdown: str,
    figures: Mapping[str, Callable[[Path], Path]] | None = None,
) -> Path:
    """Write ``report.json``, ``report.md`` and each ``figures[name](path)`` into ``out``."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(_plain(data), indent=2) + "\n")
        (tmp / "report.md").write_text(markdown)
        for name, draw in (figures or {}).items():
            draw(tmp / name)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub table; floats to 4 significant digits."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_layers(
    layers: Sequence[int],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
) -> Callable[[Path], Path]:
    """A figure drawer: one panel per entry of ``panels`` (``{label: values per layer}``)."""

    def draw(path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
        for ax, (name, lines) in zip(axes[0], panels.items(), strict=True):
            for label, values in lines.items():
                ax.plot(list(layers), list(values), marker="o", markersize=3, label=label)
            ax.set_xlabel("layer")
            ax.set_title(name, fontsize=10)
            if len(lines) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    return draw
