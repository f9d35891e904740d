"""``splice train --method ramt``: R-AMT's gradient dropout runs inside the one loop."""

from __future__ import annotations

import json

from splice.adapters.ramt import GradientDropout
from splice.train import TrainConfig, train
from tests.train.test_train import bert_dir, csv_file  # noqa: F401 (fixtures)


def test_ramt_trains_with_its_teacher_each_micro_batch(bert_dir, csv_file, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    real = GradientDropout.__call__

    def spy(self, student, teacher):
        calls.append((student.shape, teacher.requires_grad))
        return real(self, student, teacher)

    monkeypatch.setattr(GradientDropout, "__call__", spy)
    options = dict(steps=3, grad_accum=2, batch_size=8, lr=5e-3, progress=False, method="ramt")
    cfg = TrainConfig(model=bert_dir, data=str(csv_file), out=tmp_path / "o", **options)
    train(cfg)
    assert len(calls) == 6  # every micro-batch: 3 steps × 2
    assert all(shape[-1] == 2 and not grad for shape, grad in calls)  # the teacher is frozen
    saved = json.loads((tmp_path / "o" / "adapter" / "splice_adapter.json").read_text())
    assert saved["method"] == "ramt"
