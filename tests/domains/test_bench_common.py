"""splice.bench.domains.common: splits, the LR grid's choice by validation, the table."""

from __future__ import annotations

import pytest

from splice.bench.domains.common import Row, Setup, format_rows, run_grid, run_study
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


def test_study_variants_train_at_the_lr_the_grid_chose():
    calls = []

    def run_method(m, setup, backbone, data, name, lr, **options):
        calls.append((m, name, lr, backbone, data, options))
        return Row(name, 10 * lr, 1, 2, 0.0, {"val": {0.001: 1, 0.003: 9}.get(lr, 0)}, 1)

    setup = Setup(lr=1e-3, full_lr=1e-4)
    facts = {"cached": True, "accuracy": 50.0}
    bench = (lambda s: ("bb", facts), lambda s: "data", run_method)
    log = []
    got, every, best, again = run_study(setup, ("pp", "full"), (1, 3), bench, "shapes", log.append)
    assert got is facts and len(every) == 4
    assert {c[3:5] for c in calls} == {("bb", "data")}
    assert [(c[0], pytest.approx(c[2])) for c in calls] == [
        ("pp", 1e-3),
        ("pp", 3e-3),
        ("full", 1e-4),
        ("full", 3e-4),
    ]
    row = again("pp", "pp no bank", bank=False)
    assert calls[-1] == ("pp", "pp no bank", 3e-3, "bb", "data", {"bank": False})
    assert best[-1] is row and row.detail["lr"] == 3e-3
    assert log[0] == "backbone: 50.0% on held-out shapes (cached)" and log[-1].startswith(
        "pp no bank"
    )
