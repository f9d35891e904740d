"""Hyperparameter-transfer diagnostics (other.md §8.2, §8.4.3; Ghosh, Wu, Bietti 2025).

Input: a loss table ``grid[n][η]`` per proxy width (a log-spaced LR grid, each cell the
loss after a fixed token budget) and the same at the target width ``N``. Steps: the optimum
``η̂*_n`` per width (the grid's best, refined by a quadratic in ``log η`` through its 3–5
best points); the fits ``L_n(η̂*_n) = L_∞ + A n^{-b}`` and
``log η̂*_n = log η*_∞ ± B n^{-κ}``; the transfer sub-optimality
``S(n→N) = L_N(η̂*_n) − L_N(η̂*_N)`` (``L_N`` read off its own quadratic), the finite-scale
gap ``G(n, N) = L_n(η̂*_n) − L_N(η̂*_N)``, ``S/G`` and the fast-transfer verdict
``2κ > b`` (when ``η*`` does not move at all: ``S/G`` falling with ``n``). At a finite
target both fits are estimates; read them with the raw ``S`` and ``G``. Compute: a direct
grid at ``N`` costs ``K·C(N)``, transfer ``K·C(n) + C(N)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fit_power_law", "optimum", "plot_sweep", "shift_in_steps", "transfer_report"]


def optimum(losses: Mapping[float, float], top: int = 5) -> tuple[float, float]:
    """``(η̂*, L(η̂*))``: a quadratic in ``log η`` through the ``top`` best finite points
    (3 at least), kept when convex and inside the grid; else the grid's best point."""
    items = sorted((lr, loss) for lr, loss in losses.items() if math.isfinite(loss))
    if not items:
        raise ValueError("every run of this width diverged: widen the LR grid downward")
    best = min(items, key=lambda t: t[1])
    chosen = sorted(items, key=lambda t: t[1])[: max(3, top)]
    if len(chosen) < 3:
        return best
    x = np.log([lr for lr, _ in chosen])
    y = np.array([loss for _, loss in chosen])
    a, b, c = np.polyfit(x, y, 2)
    lo, hi = math.log(items[0][0]), math.log(items[-1][0])
    if a <= 0 or not lo <= -b / (2 * a) <= hi:
        return best
    xs = -b / (2 * a)
    return math.exp(xs), float(min(a * xs * xs + b * xs + c, best[1]))


def _quadratic_loss(losses: Mapping[float, float], lr: float, top: int = 5) -> float:
    """``L(lr)`` from :func:`optimum`'s quadratic (interpolated linearly if not convex)."""
    items = sorted((k, v) for k, v in losses.items() if math.isfinite(v))
    chosen = sorted(items, key=lambda t: t[1])[: max(3, top)]
    x = np.log([k for k, _ in chosen])
    a, b, c = np.polyfit(x, [v for _, v in chosen], 2)
    if a > 0:
        return float(a * math.log(lr) ** 2 + b * math.log(lr) + c)
    return float(np.interp(math.log(lr), np.log([k for k, _ in items]), [v for _, v in items]))


def fit_power_law(ns: list[float], values: list[float], *, offset: bool) -> dict[str, float]:
    """``value = c + A n^{-p}`` (``offset``) or ``A n^{-p}``; returns ``{"p", "A", "c"}``."""
    n, v = np.asarray(ns, dtype=float), np.asarray(values, dtype=float)
    if not offset:
        keep = v > 0
        if keep.sum() < 2:
            return {"p": float("nan"), "A": float("nan"), "c": 0.0}
        slope, icpt = np.polyfit(np.log(n[keep]), np.log(v[keep]), 1)
        return {"p": float(-slope), "A": float(math.exp(icpt)), "c": 0.0}
    # grid over the asymptote, least squares in log space for the rest
    best = None
    for c in np.linspace(v.min() - 2 * (np.ptp(v) + 1e-9), v.min() - 1e-9, 400):
        slope, icpt = np.polyfit(np.log(n), np.log(v - c), 1)
        err = float(((np.exp(icpt) * n**slope + c - v) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, {"p": float(-slope), "A": float(math.exp(icpt)), "c": float(c)})
    return best[1]


def _drift_exponent(widths: list[int], log_lr: list[float]) -> float | None:
    """``κ`` of ``log η*_n = log η*_∞ ± B n^{-κ}`` (``None`` when ``η*`` does not move)."""
    if len(widths) < 3 or max(log_lr) - min(log_lr) < 1e-9:
        return None
    sign = 1.0 if log_lr[0] >= log_lr[-1] else -1.0
    return fit_power_law(widths, [sign * v for v in log_lr], offset=True)["p"]


def shift_in_steps(lr_a: float, lr_b: float, grid: list[float]) -> float:
    """``|log η_a − log η_b|`` in units of the (log-uniform) grid's step."""
    step = (math.log(max(grid)) - math.log(min(grid))) / (len(grid) - 1)
    return abs(math.log(lr_a) - math.log(lr_b)) / step


def transfer_report(
    grids: Mapping[int, Mapping[float, float]],
    target: int,
    *,
    cost: Mapping[int, float] | None = None,
) -> dict[str, Any]:
    """The §8.4.3 report from ``grids[width][lr] = loss`` (``target`` among the widths).

    ``cost[width]`` is one run's compute (e.g. parameters × tokens); default: width².
    """
    widths = sorted(grids)
    proxies = [n for n in widths if n != target]
    opt = {n: optimum(grids[n]) for n in widths}
    lr_n, loss_n = {n: o[0] for n, o in opt.items()}, {n: o[1] for n, o in opt.items()}
    grid = sorted(grids[target])
    ref_loss = _quadratic_loss(grids[target], lr_n[target])
    s = {n: max(0.0, _quadratic_loss(grids[target], lr_n[n]) - ref_loss) for n in proxies}
    g = {n: loss_n[n] - loss_n[target] for n in proxies}
    gap = fit_power_law(widths, [loss_n[n] for n in widths], offset=True)
    kappa = _drift_exponent(widths, [math.log(lr_n[n]) for n in widths])
    ratio = {n: s[n] / g[n] if g[n] > 0 else None for n in proxies}
    r = [ratio[n] for n in proxies if ratio[n] is not None]
    falling = len(r) >= 2 and all(b <= a + 1e-12 for a, b in itertools.pairwise(r))
    fast = 2 * kappa > gap["p"] if kappa is not None and math.isfinite(gap["p"]) else falling
    cost = cost or {n: float(n * n) for n in widths}
    k = len(grid)
    return {
        "widths": widths,
        "target": target,
        "lr_star": lr_n,
        "loss_star": loss_n,
        "shift_steps": {n: shift_in_steps(lr_n[n], lr_n[target], grid) for n in proxies},
        "max_shift_steps": max(
            (shift_in_steps(lr_n[n], lr_n[target], grid) for n in proxies), default=0.0
        ),
        "S": s,
        "G": g,
        "S_over_G": ratio,
        "gap_fit": gap,
        "kappa": kappa,
        "S_over_G_falling": falling,
        "fast_transfer": bool(fast),
        "compute": {
            "direct": k * cost[target],
            "transfer": {n: k * cost[n] + cost[target] for n in proxies},
        },
    }


def plot_sweep(sweeps: Mapping[str, Mapping[int, Mapping[float, float]]], path: str | Path) -> Path:
    """Loss against LR per width, one panel per parametrisation, optima marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.4), squeeze=False)
    for ax, (name, grids) in zip(axes[0], sweeps.items(), strict=True):
        for n in sorted(grids):
            lrs = sorted(grids[n])
            (line,) = ax.plot(lrs, [grids[n][lr] for lr in lrs], marker=".", label=f"width {n}")
            lr, loss = optimum(grids[n])
            ax.plot([lr], [loss], marker="*", markersize=10, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
