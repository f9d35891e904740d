"""Mixed-precision bit allocation as a binary integer program (spec other.md §4.4).

Indicators ``I[ℓ, k]`` pick one option per layer; minimise the summed loss increase
``Σ I·ΔL`` subject to ``Σ I·cost ≤ budget``. It assumes, as the paper does, that per-layer
degradations add up. Solved exactly by HiGHS through :func:`scipy.optimize.milp`. The cost is
pluggable: :func:`size_cost` (bits of weights) or :func:`bops_cost` (MACs · weight bits ·
input bits), or any per-layer, per-option table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splice.errors import SpliceError

__all__ = ["allocate", "bops_cost", "size_cost"]


def size_cost(weights: Sequence[int], bits: Sequence[int]) -> np.ndarray:
    """Bits each layer's weights take at each option: ``N_ℓ · b_k`` (layers × options)."""
    return np.outer(np.asarray(weights, dtype=np.float64), np.asarray(bits, dtype=np.float64))


def bops_cost(macs: Sequence[int], bits: Sequence[int], a_bits: int | None = 8) -> np.ndarray:
    """Bit operations per layer and option: ``MACs_ℓ · b_k · a`` (``a`` = input bits, 32 if
    the input stays float)."""
    return size_cost(macs, bits) * float(a_bits or 32)


def allocate(loss: np.ndarray, cost: np.ndarray, budget: float, unit: str = "") -> np.ndarray:
    """The option index per layer that minimises ``Σ loss`` with ``Σ cost ≤ budget``.

    ``loss`` and ``cost`` are (layers × options). An unreachable budget is a
    :class:`SpliceError` naming the smallest reachable one (``unit`` labels it).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    loss, cost = np.asarray(loss, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    if loss.shape != cost.shape or loss.ndim != 2 or loss.shape[0] == 0:
        raise ValueError(f"loss {loss.shape} and cost {cost.shape} must be equal 2-d tables")
    layers, options = loss.shape
    smallest = float(cost.min(1).sum())
    if smallest > budget * (1 + 1e-12):
        raise SpliceError(
            f"the budget {budget:.6g}{unit} is below the smallest reachable {smallest:.6g}{unit}",
            fix="raise the target or allow fewer bits",
        )
    one_per_layer = np.kron(np.eye(layers), np.ones(options))
    constraints = [
        LinearConstraint(one_per_layer, 1, 1),
        LinearConstraint(cost.reshape(1, -1), -np.inf, budget),
    ]
    res = milp(
        loss.reshape(-1),
        constraints=constraints,
        integrality=np.ones(layers * options),
        bounds=Bounds(0, 1),
    )
    if res.x is None:
        raise SpliceError(f"the bit allocation found no solution: {res.message}")
    return np.round(res.x).reshape(layers, options).argmax(1)
