"""Continual metrics against a hand-made accuracy matrix (values worked out by hand below)."""

from __future__ import annotations

import json

import pytest

from splice.continual.metrics import (
    average_accuracy,
    backward_transfer,
    check_matrix,
    forgetting,
    forward_transfer,
    save_matrix,
)

# R[i][j]: accuracy on task j after training task i.
R = [
    [0.90, None, None],
    [0.70, 0.80, None],
    [0.60, 0.85, 0.70],
]


def test_average_accuracy_after_each_task():
    # 0.9; (0.7+0.8)/2 = 0.75; (0.6+0.85+0.7)/3 = 0.71666…
    assert average_accuracy(R) == pytest.approx([0.90, 0.75, 2.15 / 3])


def test_backward_transfer():
    # ((0.60-0.90) + (0.85-0.80)) / 2 = -0.125
    assert backward_transfer(R) == pytest.approx(-0.125)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: max(0.9, 0.7) - 0.6 = 0.3; task 1: max(0.8) - 0.85 = -0.05 → mean 0.125
    assert forgetting(R) == pytest.approx(0.125)
    # the max matters: a dip then a recovery is not forgetting of the best
    dip = [[0.5, None, None], [0.9, 0.5, None], [0.7, 0.5, 0.5]]
    assert forgetting(dip) == pytest.approx(((0.9 - 0.7) + 0.0) / 2)


def test_forward_transfer_against_independent_training():
    # ((0.80-0.75) + (0.70-0.80)) / 2 = -0.025; task 0 never counts
    assert forward_transfer(R, [0.0, 0.75, 0.80]) == pytest.approx(-0.025)
    assert forward_transfer(R, None) is None


def test_single_task_has_no_transfer():
    assert backward_transfer([[0.5]]) is None and forgetting([[0.5]]) is None


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0.9, 0.1], [0.8, 0.7]], r"R\[0\]\[1\] is set above the diagonal"),
        ([[0.9, None], [None, 0.7]], r"R\[1\]\[0\] is missing"),
        ([[0.9, None], [0.8]], "row 1 has 1 entries, expected 2"),
    ],
)
def test_malformed_matrices_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        check_matrix(bad)


def test_save_matrix_writes_the_record(tmp_path):
    path = tmp_path / "R.json"
    save_matrix(path, ["a", "b", "c"], R, method="share", stored={"params": 12})
    rec = json.loads(path.read_text())
    assert rec["R"][0] == [0.9, None, None] and rec["tasks"] == ["a", "b", "c"]
    assert rec["metrics"]["bwt"] == pytest.approx(-0.125)
    assert rec["stored"] == {"params": 12} and rec["method"] == "share"
    with pytest.raises(ValueError, match="2 task names"):
        save_matrix(path, ["a", "b"], R, method="share")
