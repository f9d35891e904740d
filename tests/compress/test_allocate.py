"""The integer program of spec other.md §4.4 against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from splice.compress import allocate, size_cost
from splice.errors import SpliceError


def _brute(loss: np.ndarray, cost: np.ndarray, budget: float) -> tuple[float, tuple[int, ...]]:
    best = (np.inf, ())
    for pick in itertools.product(range(loss.shape[1]), repeat=loss.shape[0]):
        rows = range(loss.shape[0])
        if sum(cost[r, k] for r, k in zip(rows, pick, strict=False)) <= budget:
            best = min(best, (sum(loss[r, k] for r, k in zip(rows, pick, strict=False)), pick))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_3_layers_by_3_options(seed):
    rng = np.random.default_rng(seed)
    loss = rng.random((3, 3)) * np.array([1.0, 0.3, 0.0])  # option 2 is the base: no loss
    cost = size_cost(rng.integers(10, 100, 3), [2, 4, 8])
    budget = float(cost[:, 1].sum() + rng.random() * cost[:, 2].min())
    pick = allocate(loss, cost, budget)
    value, best = _brute(loss, cost, budget)
    assert sum(loss[r, k] for r, k in enumerate(pick)) == pytest.approx(value)
    assert sum(cost[r, k] for r, k in enumerate(pick)) <= budget
    assert tuple(pick) == best  # random losses: the optimum is unique


def test_an_unreachable_budget_names_the_smallest_reachable():
    cost = size_cost([10, 20], [4, 8])  # smallest: 40 + 80 = 120
    with pytest.raises(SpliceError, match="below the smallest reachable 120"):
        allocate(np.zeros((2, 2)), cost, 119.0)
