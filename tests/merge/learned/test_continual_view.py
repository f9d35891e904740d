"""The bench's continual view (splice/bench/continual.py) on a fake suite: curves and files."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from splice.bench.continual import continual_methods, run_continual, to_markdown, write_continual
from splice.bench.merging import MergeSpec


@dataclass
class FakeSuite:
    """Accuracy of task t = 1 − distance of the merged weight to t's expert (bounded)."""

    encoder: object
    runs: dict
    data: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def acc(self, weights, split="test", tasks=None):
        self.calls.append(list(tasks))
        w = weights["weight"]
        return {
            t: float(1 - (w - self.runs[t].deltas["weight"]).norm().clamp(max=1)) for t in tasks
        }


def _suite(k=4):
    module = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(module.weight)
    g = torch.Generator().manual_seed(0)
    runs = {
        f"t{i}": SimpleNamespace(deltas={"weight": 0.3 * torch.randn(2, 3, generator=g)})
        for i in range(k)
    }
    return FakeSuite(SimpleNamespace(module=module, modality="text"), runs, dict.fromkeys(runs))


def test_curves_cover_each_prefix_of_each_order_and_the_individual_bound():
    suite = _suite()
    ind = {t: 0.9 for t in suite.runs}
    recs = run_continual(suite, ["opcm", "continual_task_arithmetic"], 3, seed=0, individual=ind)
    assert len(recs) == 3 * 3  # (individual + 2 methods) × 3 orders
    orders = [r["order"] for r in recs if r["method"] == "opcm"]
    assert orders[0] == list(suite.runs) and len({tuple(o) for o in orders}) > 1
    for r in recs:
        assert len(r["avg_seen"]) == 4 and r["modality"] == "text"
    assert all(r["avg_seen"] == [0.9] * 4 for r in recs if r["method"] == "individual")
    # OPCM after one task is that task's model: accuracy 1 on the one seen task
    assert all(r["avg_seen"][0] == pytest.approx(1.0) for r in recs if r["method"] == "opcm")
    assert suite.calls[0] == [orders[0][0]] and suite.calls[3] == orders[0]


def test_report_files_and_table(tmp_path):
    suite = _suite()
    recs = run_continual(suite, ["opcm"], 2, 0, {t: 1.0 for t in suite.runs})
    md = to_markdown(recs)
    assert "| opcm |" in md and "after 4" in md and "2 task orders" in md
    paths = write_continual(recs, tmp_path)
    assert [p.name for p in paths] == ["continual.md", "continual.png"]
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


def test_only_continual_learned_methods_are_selected():
    names = ["adamerging", "opcm", "continual_task_arithmetic"]
    specs = [MergeSpec("ties"), *(MergeSpec(n, learned=True) for n in names)]
    assert continual_methods(specs) == ["opcm", "continual_task_arithmetic"]
