"""The PEFT track's per-suite steps, a row's own targets and the probe's features (tiny BERT,
tests/bench/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.bench.peft import PEFT_PROFILES, PeftConfig, configure_peft, method_update, run_peft
from splice.bench.peft_report import to_markdown
from splice.errors import UsageError
from tests.bench.test_peft import _cache  # noqa: F401 — autouse: a fresh cache, one thread


def _config(tiny, **kw) -> PeftConfig:
    model_dir, paths = tiny
    base = {
        "tasks": tuple(paths[:1]),
        "methods": ("lora",),
        "steps": 4,
        "batch_size": 8,
        "lr_grid": (1e-3,),
        "full_lr_grid": (1e-4,),
        "head_lr_grid": (1e-2, 1e-1),
        "caps": (60, 20, 30),
        "text_model": str(model_dir),
        "workers": 1,
    }
    return PeftConfig(**(base | kw))


def test_suite_steps_set_a_suites_runs_and_steps_on_the_command_line_sets_all(tiny, monkeypatch):
    import splice.bench.peft_rows as peft_rows

    seen, train = [], peft_rows.train

    def spy(encoder, data, cfg, seed, **kw):
        seen.append(cfg.steps)
        return train(encoder, data, cfg, seed, **kw)

    monkeypatch.setattr(peft_rows, "train", spy)
    cfg = _config(tiny, suite_steps={"text": 5, "image": 9})
    results = run_peft(cfg)
    assert seen == [5, 5]  # LoRA's one-point grid, then full fine-tuning: the text suite's 5
    assert "4 (text: 5, image: 9) steps of batch 8" in to_markdown(results)
    # another step count is another cache entry, not a cached row of 5 steps
    again = run_peft(cfg.model_copy(update={"suite_steps": {"text": 6}}))
    assert seen[2:] == [6, 6] and not any(r["cached"] for r in again["rows"])
    assert all(r["cached"] for r in run_peft(cfg)["rows"])
    quick = PEFT_PROFILES["quick"]
    assert configure_peft("quick").suite_steps == quick.suite_steps
    assert configure_peft("quick", steps=7).model_dump() == quick.model_dump() | {
        "steps": 7,
        "suite_steps": {},
    }


def test_probe_computes_features_of_the_examples_its_batches_visit(tiny):
    from splice.bench.finetune import batch_stream
    from splice.bench.peft_rows import Task
    from splice.bench.runner import load_backbone
    from splice.bench.suite import _features
    from splice.data.local import resolve_task

    cfg = _config(tiny, steps=3)
    group = load_backbone(cfg, "text", [resolve_task(cfg.tasks[0])])
    name = next(iter(group.data))
    task = Task(group, name, cfg)
    out = task.run("probe", 1e-1, 1e-1, 0, {"key": "probe"})
    stream = batch_stream(len(task.train_x), 8, 0)
    visited = np.unique(np.concatenate([stream() for _ in range(3)]))
    assert np.flatnonzero(task._have).tolist() == visited.tolist()  # 24 of the 60
    every = _features(group.encoder, task.train_x, None, 128)  # the whole split, in one go
    feats = task.frozen["train"]
    assert torch.allclose(feats[visited], every[visited], atol=1e-5)
    assert not feats[np.setdiff1d(np.arange(len(every)), visited)].any()
    # a second seed adds the examples its batches visit and keeps the computed ones
    task.run("probe", 1e-1, 1e-1, 1, {"key": "probe"})
    assert task._have.sum() > len(visited) and torch.equal(
        task.frozen["train"][visited], feats[visited]
    )
    assert 0.0 <= task.score(out, "test") <= 1.0


def test_a_rows_targets_move_its_adapter_and_bad_ones_are_named(tiny):
    qkv = ["query", "key", "value"]
    options = {"lora": {"targets": qkv}, "nola": {"targets": ["nosuch"], "k": 16, "l": 16}}
    results = run_peft(_config(tiny, methods=("lora", "nola"), options=options))
    lora, nola = (next(r for r in results["rows"] if r["key"] == k) for k in ("lora", "nola"))
    # 2 layers × 3 matrices × r=8 × (32 + 32); on query/value it is 4 matrices
    assert lora["status"] == "ok" and lora["targets"] == qkv
    assert lora["adapter_params"] == 6 * 8 * 64 and lora["options"] == {}  # not a LoRA option
    assert nola["status"] == "n/a" and "nosuch" in nola["reason"]
    sized = run_peft(_config(tiny, options={"lora": {"targets": qkv}}, budget=1536))
    row = next(r for r in sized["rows"] if r["key"] == "lora")
    assert row["adapter_params"] == 1536 and row["options"]["r"] == 4  # 1536 / (6 · 64)
    assert method_update(None, {"lora": {"targets": qkv, "r": 4}}) == {
        "options": {"lora": {"targets": qkv, "r": 4}}
    }
    for bad in ("query", [], [1]):
        with pytest.raises(UsageError, match=r"lora\.targets=.* is not a list of module names"):
            method_update(None, {"lora": {"targets": bad}})


def test_a_methods_rows_do_not_start_together_where_another_row_can_go_between():
    from splice.bench.peft_pool import apart

    # longest first: R-AMT text, R-AMT digits, SPT, LoRA → the two R-AMT rows split by SPT
    assert apart([0, 1, 2, 3], ["ramt", "ramt", "spt", "lora"]) == [0, 2, 1, 3]
    assert apart([3, 2, 1, 0], ["x", "y", "y", "x"]) == [3, 2, 0, 1]
    assert apart([0, 1, 2], ["a", "a", "a"]) == [0, 1, 2] and apart([], []) == []


def test_grid_growth_walks_the_1_2_5_ladder_past_an_edge_pick_at_most_grow_times():
    from splice.bench.peft_rows import _grow, _pick

    assert [_grow(5e-3, 1), _grow(1e-3, -1), _grow(2e-3, 1), _grow(1e-2, -1)] == [
        1e-2, 5e-4, 5e-3, 5e-3
    ]  # fmt: skip
    rising, falling = (lambda lr: lr), (lambda lr: -lr)
    assert _pick([1e-3, 5e-3], 0, rising) == (5e-3, {1e-3: 1e-3, 5e-3: 5e-3})
    best, val = _pick([1e-3, 5e-3], 1, rising)  # NOLA's case: 5e-3 on the edge → 1e-2 tried
    assert best == 1e-2 and sorted(val) == [1e-3, 5e-3, 1e-2]
    best, val = _pick([1e-3, 5e-3], 2, falling)
    assert best == 2e-4 and sorted(val) == [2e-4, 5e-4, 1e-3, 5e-3]
    peak = {1e-3: 0.5, 5e-3: 0.7, 1e-2: 0.6}  # an inside pick stops the growth
    best, val = _pick([1e-3, 5e-3], 3, peak.__getitem__)
    assert best == 5e-3 and sorted(val) == [1e-3, 5e-3, 1e-2]
    flat = lambda lr: 0.5  # noqa: E731 — ties go to the smaller lr, an edge pick like any other
    assert _pick([1e-3, 5e-3], 0, flat)[0] == 1e-3 and _pick([1e-3, 5e-3], 1, flat)[0] == 5e-4


def test_grow_reaches_the_config():
    cfg = configure_peft("full", grow=1)
    assert cfg.grow == 1 and configure_peft("full").grow == 0
