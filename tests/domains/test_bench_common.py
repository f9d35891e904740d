"""splice.bench.domains.common: splits, the LR grid's choice by validation, the table."""

from __future__ import annotations

import pytest

from splice.bench.domains.common import Row, Setup, format_rows, run_grid
from splice.errors import SpliceError


def test_splits_hold_out_validation_from_train():
    assert Setup(train=10, val=3, test=4).splits() == (slice(0, 7), slice(7, 10), slice(10, 14))
    with pytest.raises(SpliceError, match="val=10 of train=10"):
        Setup(train=10, val=10).splits()


def test_grid_keeps_the_best_validation_row_not_the_best_test_row():
    val = {("a", 1.0): 50, ("a", 3.0): 70, ("b", 0.5): 10, ("b", 1.5): 5}
    test = {("a", 1.0): 90, ("a", 3.0): 60, ("b", 0.5): 1, ("b", 1.5): 2}

    def run(m, name, lr):
        return Row(name, test[m, lr], 1, 2, 0.0, {"val": val[m, lr]}, 1)

    every, best = run_grid(("a", "b"), (1, 3), {"a": 1.0, "b": 0.5}.get, run, log=lambda s: None)
    assert [r.method for r in every] == ["a lr=1", "a lr=3", "b lr=0.5", "b lr=1.5"]
    assert [(r.method, r.score, r.detail["lr"]) for r in best] == [("a", 60, 3.0), ("b", 1, 0.5)]
    table = format_rows(best, "a").splitlines()
    assert table[0].startswith("| method | score | Δ a | lr | val |")
    assert table[3].startswith("| b | 1.00 | -59.00 | 0.5 | 10 |")
