"""benchmarks/peft_slowest_box.py: the slowest-box model of docs/bench.md, on a hand-made run."""

from __future__ import annotations

import importlib.util

from tests.docs._markdown import ROOT


def _script():
    spec = importlib.util.spec_from_file_location(
        "slowest", ROOT / "benchmarks/peft_slowest_box.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_scale_training_and_the_rest_apart_and_share_the_workers():
    row = {"suite": "text", "task": "t"}
    results = {
        "config": {"steps": 10, "suite_steps": {"image": 20}},
        "meta": {"wall_s": 30.0, "load_s": 1.0, "workers": 2,
                 "row_s": {"text/t/probe": [1, 1], "text/t/a": [5, 4], "text/t/b": [3, 3],
                           "text/t/c": [2, 2], "image/t/d": [9, 8]}},
        "rows": [
            row | {"key": "probe", "acc": [0.5]},
            row | {"key": "a", "s_per_step": 0.1, "val": {"1": 0, "2": 0}, "acc": [0]},
            row | {"key": "b", "s_per_step": 0.05, "val": {"1": 0, "2": 0}, "acc": [0]},
            row | {"key": "c", "s_per_step": 0.05, "val": {"1": 0}, "acc": [0]},
            # a searched row picked over two seeds: 3 points × 2 seeds, then 1 more seed
            {"suite": "image", "task": "t", "key": "d", "s_per_step": 0.05, "acc": [0, 0, 0],
             "val": {"1": 0, "2": 0, "3": 0}, "val_seeds": {"1": [0, 0]}},
        ],
    }  # fmt: skip
    m = _script().model(results, train=3.4, rest=5.0)
    assert m["rows"] == {"text": 10, "image": 8}
    # training a 2.0 s, b 1.0, c 0.5, d 0.05 × 20 × 7 = 7.0; the rest at 5x
    a, b, c, d = 2 * 3.4 + 2 * 5, 3.4 + 2 * 5, 0.5 * 3.4 + 1.5 * 5, 7 * 3.4 + 1 * 5
    # longest estimate first to the first free worker: d | a, then b, c to the one free first
    assert abs(m["model_s"] - (5 + 5 + max(d + c, a + b))) < 1e-9
