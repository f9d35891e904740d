"""Tiny models, task vectors and data for the learned-merge tests (built in memory)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

TASKS = ("a", "b", "c")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear → LayerNorm → Tanh → Linear: a linear, a norm and an output layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 4)).to(dtype)


def deltas(module: nn.Module, scale: float = 0.5, seed: int = 1) -> dict[str, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        t: {
            n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in module.named_parameters()
        }
        for t in TASKS
    }


def heads(
    dim: int = 4, classes: int = 3, seed: int = 2, dtype=torch.float64
) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {t: nn.Linear(dim, classes).to(dtype) for t in TASKS}


def inputs(n: int = 24, dim: int = 5, seed: int = 3, dtype=torch.float64) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(n, dim, generator=g, dtype=dtype) for t in TASKS}


def merged_copy(module: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A deep copy of ``module`` with ``weights`` loaded the ordinary way (reference path)."""
    import copy

    out = copy.deepcopy(module)
    out.load_state_dict({k: v.detach() for k, v in weights.items()}, strict=False)
    return out


def separable(dim: int = 12, classes: int = 3, n: int = 48, seed: int = 0):
    """A linear model at W₀ = 0 and three tasks on disjoint input coordinates; each task's
    labels are its expert's argmax, so merging with the right coefficients fits all three."""
    g = torch.Generator().manual_seed(seed)
    module = nn.Linear(dim, classes, bias=False)
    nn.init.zeros_(module.weight)
    block = dim // len(TASKS)
    ds, data = {}, {}
    for i, t in enumerate(TASKS):
        tau = torch.zeros(classes, dim)
        tau[:, i * block : (i + 1) * block] = torch.randn(classes, block, generator=g)
        x = torch.zeros(n, dim)
        x[:, i * block : (i + 1) * block] = torch.randn(n, block, generator=g)
        ds[t] = {"weight": tau}
        data[t] = (x, (x @ tau.T).argmax(-1))
    return module, ds, data
