"""The quick profile's settings, the up-front estimate, progress lines in a log, the memo."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from splice.bench.merging import merge_specs
from splice.bench.plan import FACTORS, plan_run
from splice.bench.progress import Phase, Progress, clock
from splice.bench.runner import PROFILES, QUICK_METHODS, _specs, configure


def test_progress_lines_stream_to_a_log_while_the_run_goes_on(tiny, tmp_path):
    """stderr is a pipe (a CI log): the estimate and each phase's line arrive as they happen,
    not at the end, with elapsed time, ETA and the training speed per 100 steps."""
    model_dir, paths = tiny
    cmd = [sys.executable, "-m", "splice.cli", "bench", "--tasks", ",".join(paths),
           "--text-model", str(model_dir), "--methods", "task_arithmetic,ties", "--steps", "20",
           "--out", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "SPLICE_CACHE": str(tmp_path / "cache"), "COLUMNS": "80"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []  # (line, whether the process was still running when it arrived)
    for line in proc.stderr:
        lines.append((line.rstrip("\n"), proc.poll() is None))
    proc.stdout.read()
    assert proc.wait() == 0, "\n".join(x for x, _ in lines)
    text = [x for x, _ in lines if "Warning" not in x]
    estimate = next(i for i, x in enumerate(text) if x.startswith("estimate "))
    assert "2 tasks × 1 seed(s), 2 merge settings" in text[estimate]
    phase = [x for x in text if x.startswith("[") and "| ETA" in x]
    starts = ["train mood", "train topic", "evaluate zero-shot", "evaluate task_arithmetic:",
              "evaluate ties:"]  # fmt: skip
    assert len(phase) == len(starts)
    assert all(x.split("] ", 1)[1].startswith(s) for x, s in zip(phase, starts, strict=True))
    assert all(" s per 100 steps, final loss " in x for x in phase[:2])
    assert phase[-1].split("ETA", 1)[1].split("]")[0].strip() == "0:00"
    running = dict((x, r) for x, r in lines)
    assert running[text[estimate]] and running[phase[0]]  # written before the process ended


def test_quick_profile_is_four_methods_at_their_defaults_and_full_keeps_the_grids():
    quick, full = configure("quick"), configure("full")
    assert quick.methods == QUICK_METHODS == ("task_arithmetic", "ties", "lot", "opcm")
    assert quick.lambda_grid == () and quick.continual_orders == 0
    assert [s.key for s in _specs(quick)] == ["task_arithmetic", "ties", "lot", "opcm"]
    assert full.methods is None and full.lambda_grid == PROFILES["full"].lambda_grid
    full_keys = [s.key for s in _specs(full)]
    assert "task_arithmetic@tuned" in full_keys and "adamerging@steps=50" in full_keys
    assert configure("quick", methods=["all"]).methods is None
    assert configure("quick", methods=["ties"]).methods == ("ties",)


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _Group:
    def __init__(self, modality: str, sizes: dict[str, tuple[int, int]]) -> None:
        self.encoder = type("E", (), {"modality": modality})()
        self.data = dict.fromkeys(sizes)
        self.val = {t: _Sized(v) for t, (v, _) in sizes.items()}
        self.test = {t: _Sized(x) for t, (_, x) in sizes.items()}


def test_plan_counts_each_phase_from_its_examples():
    cfg = PROFILES["quick"].model_copy(update={"seeds": (0, 1), "lambda_grid": (0.5, 1.0)})
    cfg = cfg.model_copy(update={"methods": ("task_arithmetic", "slerp")})
    specs = merge_specs(cfg.methods, cfg.lambda_grid)
    group = _Group("text", {"a": (10, 40), "b": (20, 60)})
    cached = {"train/text/0/a": True, "train/text/0/b": False}
    cached |= {"train/text/1/a": False, "train/text/1/b": False}
    t = 0.01
    phases = {p.key: p for p in plan_run(cfg, specs, [group], {"text": t}, cached)}
    ev, tr = FACTORS["text"]
    assert phases["train/text/0/a"].est == 0.0  # cached
    assert phases["train/text/1/b"].est == pytest.approx(100 * 32 * tr * t)
    n_val, n_test = 30, 100
    assert phases["evaluate/text/0/references"].est == pytest.approx((2 * n_test + n_val) * ev * t)
    assert phases["evaluate/text/1/task_arithmetic"].est == pytest.approx(n_test * ev * t)
    tuned = phases["evaluate/text/0/task_arithmetic@tuned"].est
    assert tuned == pytest.approx((2 * n_val + n_test) * ev * t)
    assert phases["evaluate/text/0/slerp"].est == 0.0  # merges two models: skipped
    assert len(phases) == 2 * (2 + 1 + 3)  # per seed: 2 tasks, references, 3 settings


def test_eta_rescales_the_remaining_phases_by_the_speed_of_finished_ones():
    from rich.console import Console

    log = io.StringIO()  # not a terminal: plain lines, no live bars
    times = iter([0.0, 30.0, 60.0, 65.0])
    progress = Progress(Console(file=log, width=40), lambda: next(times))
    progress.plan([
        Phase("t1", "train", 10.0), Phase("t2", "train", 10.0),
        Phase("e1", "evaluate", 5.0), Phase("e2", "evaluate", 5.0),
    ])  # fmt: skip
    assert progress.eta() == 30.0
    progress.done("t1", "", 30.0)  # training runs 3× slower than estimated
    assert progress.eta() == pytest.approx(3 * 10 + 3 * 10)  # evaluation not seen yet: 3× too
    progress.done("t2", "", 30.0)
    progress.done("e1", "evaluate e1", 5.0)  # evaluation at its estimate
    assert progress.eta() == pytest.approx(5.0)
    assert progress.bar is None
    assert log.getvalue().splitlines()[-1] == "[   1:05 | ETA    0:05] evaluate e1"
    assert [clock(s) for s in (0.4, 59.6, 83, 3725)] == ["0:00", "1:00", "1:23", "1:02:05"]


def test_accuracy_is_remembered_by_weight_content_and_equals_a_plain_loop(tiny, monkeypatch):
    from splice.bench import suite as suite_mod
    from splice.bench.finetune import Head, TaskRun
    from splice.data.encoders import load_encoder
    from splice.data.local import local_task
    from splice.data.registry import Caps, load_task

    model_dir, paths = tiny
    encoder = load_encoder("text", text_model=model_dir)
    data = {Path(p).stem: load_task(local_task(Path(p)), Caps(90, 20, 40)) for p in paths}
    test = {t: encoder.prepare(d.test.x) for t, d in data.items()}
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for t, d in data.items():
        k = len(d.classes)
        runs[t] = TaskRun(t, {}, Head(torch.randn(k, encoder.dim, generator=gen), torch.randn(k)))
    s = suite_mod.Suite(encoder, data, test, test, runs, batch_size=7)
    name = "encoder.layer.0.attention.self.query.weight"
    w = encoder.module.state_dict()[name]
    weights = {name: w + 0.05 * torch.randn(w.shape, generator=gen)}

    calls = []
    real = suite_mod._features
    monkeypatch.setattr(suite_mod, "_features", lambda *a: calls.append(a[1]) or real(*a))
    first = s.acc(weights)
    assert len(calls) == 2
    assert s.acc({name: weights[name].clone()}) == first and len(calls) == 2  # same content
    changed = weights[name].clone()
    changed[0, 0] += 1e-3
    s.acc({name: changed})
    assert len(calls) == 4  # one element differs: evaluated again

    for t, d in data.items():  # reference: one example at a time, with autograd on
        ids = test[t].ids
        preds = []
        for i in range(len(ids)):
            batch = {"input_ids": torch.as_tensor(ids[i])[None],
                     "attention_mask": torch.ones(1, len(ids[i]), dtype=torch.long)}  # fmt: skip
            h = functional_call(encoder.module, weights, args=(), kwargs=batch)
            pooled = h.last_hidden_state.mean(1)
            preds.append(int(runs[t].head(pooled).argmax()))
        assert first[t] == pytest.approx(float(np.mean(np.asarray(preds) == d.test.y)), abs=0)


def test_calibration_times_the_forward_pass(tiny):
    from splice.bench.plan import calibrate
    from splice.data.encoders import load_encoder
    from splice.data.local import local_task
    from splice.data.registry import Caps, load_task

    model_dir, paths = tiny
    encoder = load_encoder("text", text_model=model_dir)
    tasks = [load_task(local_task(Path(p)), Caps(90, 20, 40)) for p in paths]
    sets = {d.name: encoder.prepare(d.val.x) for d in tasks}
    start = time.perf_counter()
    per_example = calibrate(encoder, sets)
    total = time.perf_counter() - start
    n = sum(min(32, len(s)) for s in sets.values())
    assert 0 < per_example * n <= total
