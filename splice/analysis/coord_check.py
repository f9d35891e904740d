"""The coordinate check (other.md §8.4.2): activation size against width, per layer and step.

Train a few steps at several widths and record the mean ``|x|`` of chosen module outputs on
a fixed batch. Under a correct μP every curve is flat in width; under SP they grow (or
shrink) with it. :func:`slopes` fits ``log size = a + s · log width`` per (step, module); the
training that produces the table runs in :mod:`splice.train.mup_runs` (the one loop).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["Table", "plot_coord_check", "record_sizes", "recording", "slopes"]

Table = dict[int, dict[int, dict[str, float]]]
"""``table[width][step][module] = mean |output|``."""


@contextmanager
def recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, float]]:
    """Forward hooks that store each named module's mean ``|output|``; removed on exit."""
    sizes: dict[str, float] = {}
    handles = []
    try:
        for name in names:

            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                sizes[name] = (out[0] if isinstance(out, tuple) else out).abs().mean().item()

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def record_sizes(model: nn.Module, x: Tensor, names: Sequence[str]) -> dict[str, float]:
    """Mean ``|output|`` of each named module on one forward of ``x``."""
    with recording(model, names) as sizes:
        model(x)
    return dict(sizes)


def slopes(table: Table) -> dict[int, dict[str, float]]:
    """Least-squares slope of log size against log width, per step and module."""
    widths = sorted(table)
    lx = torch.tensor([math.log(w) for w in widths], dtype=torch.float64)
    lx = lx - lx.mean()
    out: dict[int, dict[str, float]] = {}
    for step in table[widths[0]]:
        out[step] = {}
        for name in table[widths[0]][step]:
            ly = torch.tensor([math.log(max(table[w][step][name], 1e-30)) for w in widths])
            out[step][name] = float(
                (lx * (ly.double() - ly.double().mean())).sum() / lx.pow(2).sum()
            )
    return out


def plot_coord_check(tables: dict[str, Table], path: str | Path) -> Path:
    """One row per parametrisation, one panel per recorded step: size vs width per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tables)
    steps = sorted(next(iter(next(iter(tables.values())).values())))
    fig, axes = plt.subplots(
        len(names),
        len(steps),
        figsize=(3.2 * len(steps), 2.8 * len(names)),
        squeeze=False,
        sharey="row",
    )
    for i, name in enumerate(names):
        table = tables[name]
        widths = sorted(table)
        for j, step in enumerate(steps):
            ax = axes[i][j]
            for module in table[widths[0]][step]:
                ax.plot(widths, [table[w][step][module] for w in widths], marker="o", label=module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}, step {step}", fontsize=9)
            ax.set_xlabel("width")
        axes[i][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
