"""Optimal-transport pieces of Transformer fusion (merging.md §13.3, §16 item 14).

Transport maps are ``(n0, n1)`` matrices from a model's neurons to the anchor's. :func:`solve`
returns ``T = n0·T*`` (row sums 1) from POT's exact EMD or Sinkhorn; :func:`barycentric`
divides each column by its sum, so ``barycentric(T)ᵀ·v`` gives each anchor neuron the mean of
the model-0 neurons sent to it. Inputs are aligned with ``T`` (a neuron's outgoing weights go
where the neuron went) and outputs with ``barycentric(T)``; for equal widths the two coincide
(column sums ``n0/n1 = 1``), for unequal widths this pairing keeps a layer's function when
the map is a hard assignment [derived].
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["Residual", "Solver", "barycentric", "combine", "cost_matrix", "solve"]

Solver = Literal["emd", "sinkhorn"]
Residual = Literal["mean", "only_resid", "no_resid"]


def _pot() -> Any:
    try:
        import ot
    except ImportError:  # pragma: no cover - depends on the environment
        raise SpliceError(
            "OT fusion needs the POT library",
            fix="pip install 'splice[fusion]' (or pip install pot)",
        ) from None
    return ot


def cost_matrix(x0: Tensor, x1: Tensor, *, standardize: bool = True) -> Tensor:
    """Euclidean (not squared) distances between the rows of ``x0`` ``(n0, d)`` and ``x1``
    ``(n1, d)``, divided by the largest. Activations: rows are neurons, columns samples, each
    row standardised over the samples first; weights: rows are unit-normed first."""
    a, b = x0.double(), x1.double()
    if standardize:
        a = (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True, unbiased=False) + 1e-9)
        b = (b - b.mean(1, keepdim=True)) / (b.std(1, keepdim=True, unbiased=False) + 1e-9)
    else:
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = torch.cdist(a, b)
    top = c.max()
    return c / top if top > 0 else c


def solve(cost: Tensor, solver: Solver = "emd", reg: float = 0.08) -> Tensor:
    """``n0·T*`` for uniform marginals: exact EMD or entropic Sinkhorn with ``reg``."""
    ot = _pot()
    c = cost.double().cpu().numpy()
    n0, n1 = c.shape
    mu, nu = np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1)
    if solver == "emd":
        plan = ot.emd(mu, nu, c, numItermax=1_000_000)
    elif solver == "sinkhorn":
        plan = ot.sinkhorn(mu, nu, c, reg, numItermax=10_000)
    else:
        raise SpliceError(f"OT solver {solver!r}", fix="use 'emd' or 'sinkhorn'")
    return torch.from_numpy(np.asarray(plan) * n0)


def barycentric(t: Tensor) -> Tensor:
    """``T`` with each column divided by its sum (columns that receive nothing stay 0)."""
    return t / t.sum(0, keepdim=True).clamp_min(1e-300)


def combine(t_res: Tensor | None, t_branch: Tensor, policy: Residual = "mean") -> Tensor:
    """The residual stream's map after ``x + branch(x)`` (merging.md §13.4 item 3)."""
    if t_res is None or policy == "no_resid":
        return t_branch
    if policy == "only_resid":
        return t_res
    return 0.5 * (t_res + t_branch)
