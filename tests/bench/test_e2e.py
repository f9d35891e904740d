"""End-to-end benchmark runs on a tiny BERT built in the test (and a short vision run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splice.bench import finetune
from splice.bench.finetune import FinetuneConfig, finetune_cached
from splice.bench.report import summarize, write_report
from splice.bench.runner import BenchConfig, run_bench
from splice.data.encoders import load_encoder
from splice.data.local import local_task
from splice.data.registry import Caps, load_task


def _config(tiny, **kw) -> BenchConfig:
    model_dir, paths = tiny
    base = {
        "tasks": tuple(paths),
        "methods": ("task_arithmetic", "linear", "ties", "dare", "lines", "opcm", "adamerging"),
        "learned_steps": 2,
        "continual_orders": 0,
        "train": FinetuneConfig(steps=40, batch_size=16),
        "caps": (90, 20, 40),
        "text_model": str(model_dir),
        "lambda_grid": (0.5, 1.0),
    }
    return BenchConfig(**(base | kw))


def _acc(results, key):
    return next(r for r in results["rows"] if r["key"] == key)["acc"]


def test_end_to_end_files_cache_and_single_task_merge(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    first = run_bench(_config(tiny))
    assert [r["cached"] for r in first["runs"]] == [False, False]
    keys = [r["key"] for r in first["rows"]]
    assert keys[:2] == ["zero_shot", "individual"]
    assert keys[2:] == [
        "task_arithmetic",
        "task_arithmetic@tuned",
        "linear",
        "ties",
        "ties@tuned",
        "dare@p=0.5",
        "dare@p=0.5@tuned",
        "task_arithmetic@lambda=1.0@+lines@tuned",
        "opcm",
        "adamerging@steps=2",
    ]
    for row in first["rows"]:
        assert set(row["acc"]) == {"mood", "topic"}
        assert all(0.0 <= a[0] <= 1.0 for a in row["acc"].values())
    tuned = next(r for r in first["rows"] if r["key"] == "task_arithmetic@tuned")
    assert tuned["params"][0]["lambda"] in (0.5, 1.0) and tuned["merge_s"][0] >= 0

    out = tmp_path / "out"
    paths = write_report(first, out)
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    norm = {s["key"]: s["avg_norm"][0] for s in data["summary"]}
    assert norm["individual"] == pytest.approx(1.0)
    ind, ta = _acc(first, "individual"), _acc(first, "task_arithmetic")
    expect = np.mean([ta[t][0] / ind[t][0] for t in ("mood", "topic")])
    assert norm["task_arithmetic"] == pytest.approx(expect)
    md = (out / "results.md").read_text()
    assert "| zero-shot |" in md and "mood" in md and "task_arithmetic" in md

    again = run_bench(_config(tiny, methods=("task_arithmetic",)))  # cached: same numbers
    assert [r["cached"] for r in again["runs"]] == [True, True]
    assert [r["acc"] for r in again["rows"]] == [r["acc"] for r in first["rows"][:4]]

    # One task merged with nothing else is that task's fine-tuned model.
    single = run_bench(_config(tiny, tasks=(tiny[1][1],), methods=("task_arithmetic", "linear")))
    assert [r["cached"] for r in single["runs"]] == [True]
    individual = _acc(single, "individual")["topic"]
    assert individual == _acc(first, "individual")["topic"]
    assert _acc(single, "task_arithmetic")["topic"] == individual
    assert _acc(single, "linear")["topic"] == individual


def test_interrupted_training_leaves_no_cache_entry(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    model_dir, paths = tiny
    data = load_task(local_task(Path(paths[0])), Caps(90, 20, 40))
    encoder = load_encoder("text", text_model=model_dir)
    cfg = FinetuneConfig(steps=10, batch_size=16)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    runs = tmp_path / "cache" / "bench" / "runs"
    with pytest.raises(KeyboardInterrupt):
        finetune_cached(encoder, data, cfg, 0, interrupt)
    assert not runs.exists() or list(runs.iterdir()) == []

    def interrupt_write(*args, **kwargs):  # Ctrl-C after the deltas, before the head
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "save_file", interrupt_write)
    with pytest.raises(KeyboardInterrupt):
        finetune_cached(encoder, data, cfg, 0)
    assert list(runs.iterdir()) == []  # neither the entry nor its temp dir
    monkeypatch.undo()
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    run, cached = finetune_cached(encoder, data, cfg, 0)
    entries = list(runs.iterdir())
    assert not cached and len(entries) == 1 and entries[0].name.startswith("mood-")
    assert sorted(p.name for p in entries[0].iterdir()) == [
        "deltas.safetensors",
        "head.safetensors",
        "meta.json",
    ]
    assert set(run.deltas) == {
        f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")
    }
    again, cached = finetune_cached(encoder, data, cfg, 0)
    assert cached
    for name, d in run.deltas.items():
        assert np.array_equal(d.materialize().numpy(), again.deltas[name].materialize().numpy())
    (entries[0] / "deltas.safetensors").write_bytes(b"\x00" * 12)  # damaged: retrained
    fresh, cached = finetune_cached(encoder, data, cfg, 0)
    assert not cached and set(fresh.deltas) == set(run.deltas)
    assert finetune_cached(encoder, data, cfg, 0)[1]  # and stored again


def test_summary_means_and_stds_over_seeds():
    results = {
        "tasks": {"a": {}, "b": {}},
        "rows": [
            {"key": "individual", "label": "individual", "kind": "reference",
             "acc": {"a": [0.8, 0.6], "b": [0.5, 0.5]}, "merge_s": [], "params": []},
            {"key": "m", "label": "m", "kind": "merge",
             "acc": {"a": [0.4, 0.6], "b": [0.5, 0.25]}, "merge_s": [0.1, 0.3], "params": []},
        ],
    }  # fmt: skip
    m = {s["key"]: s for s in summarize(results)}["m"]
    sd = 2**-0.5  # sample std (ddof=1) of two values is |x - y| / sqrt(2)
    assert m["acc"]["a"] == pytest.approx((0.5, 0.2 * sd))
    assert m["avg_acc"] == pytest.approx((0.4375, 0.025 * sd))  # seeds: 0.45, 0.425
    assert m["avg_norm"] == pytest.approx((0.75, 0.0))  # seeds: (0.5+1)/2, (1+0.5)/2
    assert m["merge_s"] == pytest.approx((0.2, 0.2 * sd))


def test_vision_run_adapts_the_1x1_convs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(
        tasks=("sk_digits", "mnist_5k"),
        methods=("task_arithmetic",),
        train=FinetuneConfig(steps=4, batch_size=16),
        caps=(64, 20, 40),
        lambda_grid=(),
    )
    results = run_bench(cfg)
    assert [r["key"] for r in results["rows"]] == ["zero_shot", "individual", "task_arithmetic"]
    assert {t["modality"] for t in results["tasks"].values()} == {"image"}
    run = tmp_path / "cache" / "bench" / "runs"
    entry = next(p for p in run.iterdir() if p.name.startswith("sk_digits-"))
    names = set(finetune.load_deltas(entry / "deltas.safetensors"))
    assert "_conv_head.weight" in names and "_blocks.15._project_conv.weight" in names
    assert all(n.endswith(("_expand_conv.weight", "_project_conv.weight", "_conv_head.weight"))
               for n in names)  # fmt: skip


def test_several_seeds_report_mean_and_std(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    results = run_bench(_config(tiny, methods=("task_arithmetic",), seeds=(0, 1)))
    assert [(r["task"], r["seed"]) for r in results["runs"]] == [
        ("mood", 0),
        ("topic", 0),
        ("mood", 1),
        ("topic", 1),
    ]
    for row in results["rows"]:
        assert all(len(v) == 2 for v in row["acc"].values())
    tuned = next(r for r in results["rows"] if r["key"] == "task_arithmetic@tuned")
    assert len(tuned["params"]) == 2 and len(tuned["merge_s"]) == 2
    md = (write_report(results, tmp_path / "out")[1]).read_text()
    assert md.count(" ± ") >= 3 * 4  # every cell of every row: mean ± std


def test_methods_that_cannot_take_the_task_count_say_why():
    from splice.bench.merging import MergeSpec, unsupported

    assert unsupported(MergeSpec("slerp"), 1) is None
    assert unsupported(MergeSpec("slerp"), 4) == "merges exactly 1 model besides the base, not 4"
    assert unsupported(MergeSpec("ties"), 4) is None
    assert unsupported(MergeSpec("dare"), 4) == "needs values for p (no defaults)"


def test_continual_view_reuses_the_merge_rows_evaluation(tiny, tmp_path, monkeypatch):
    """The last step of each continual method is its merge row's model: evaluated once."""
    from splice.bench import suite

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = suite._features
    monkeypatch.setattr(suite, "_features", lambda *a: calls.append(1) or real(*a))
    cfg = _config(tiny, methods=("opcm", "continual_task_arithmetic"), continual_orders=1)
    results = run_bench(cfg)
    for method in ("opcm", "continual_task_arithmetic"):
        curve = next(r for r in results["continual"] if r["method"] == method)["avg_seen"]
        assert curve[-1] == np.mean([a[0] for a in _acc(results, method).values()])
    # zero-shot 2 + individual 2 + two merge rows × 2 tasks + after the first task 1 per method
    assert len(calls) <= 2 + 2 + 2 * 2 + 2 * 1  # without the memo: + 2 × 2 for the last steps


def test_adalora_allocates_ranks_in_the_bench_loop(tiny, tmp_path, monkeypatch):
    """The bench's training gives AdaLoRA the run's length and calls its after_step: by the
    last step the budget (target_r per matrix) is all that is left of the Λ entries. Before,
    total_step stayed unset and AdaLoRA trained as a plain SVD-LoRA."""
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    from splice.adapters import adapter_layers

    model_dir, paths = tiny
    data = load_task(local_task(Path(paths[0])), Caps(90, 20, 40))
    encoder = load_encoder("text", text_model=model_dir)
    cfg = FinetuneConfig(finetune="adalora", steps=6, batch_size=16)
    done = finetune.train(encoder, data, cfg, 0, options={"r": 4, "target_r": 2})
    lams = [layer.adapter.lora_E for layer in adapter_layers(done.model).values()]
    assert lams and sum(int(e.count_nonzero()) for e in lams) == 2 * len(lams)
