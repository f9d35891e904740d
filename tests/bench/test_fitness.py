"""Bench fitness (``splice evolve --bench``): the models it writes, its score against an
accuracy computed here with transformers, and a CMA-ES search scored by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from splice.bench.fitness import BenchFitness
from splice.data.local import local_task
from splice.data.registry import Caps, load_task
from splice.merge.evolve import evolve
from tests.cli._run import run_cli

CAPS = (90, 20, 40)


@pytest.fixture
def fitness(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    model_dir, paths = tiny
    train = {"steps": 40, "batch_size": 16}
    return BenchFitness.of(paths, text_model=str(model_dir), caps=CAPS, train=train)


def _val_accuracy(model_dir, head_dir, task_csv) -> float:
    """Mean-pooled features of the val split through transformers, the task's cached head."""
    from transformers import AutoModel, AutoTokenizer

    data = load_task(local_task(Path(task_csv)), Caps(*CAPS), 0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(list(data.val.x), truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    feats = (h * m).sum(1) / m.sum(1)
    head = load_file(str(head_dir / "head.safetensors"))
    pred = (feats @ head["weight"].T + head["bias"]).argmax(-1).numpy()
    return float((pred == data.val.y).mean())


def test_prepare_writes_the_fine_tunes_and_scores_them(fitness, tiny, tmp_path):
    dirs = fitness.prepare(tmp_path / "models")
    assert list(dirs) == ["base", "mood", "topic"]
    base = load_file(str(dirs["base"] / "model.safetensors"))
    mood = load_file(str(dirs["mood"] / "model.safetensors"))
    changed = {n for n in base if not torch.equal(base[n], mood[n])}
    assert changed == {
        f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")
    }  # the bench's LoRA targets, merged into the weights
    runs = tmp_path / "cache" / "bench" / "runs"
    for task, csv in zip(("mood", "topic"), tiny[1], strict=True):
        head_dir = next(p for p in runs.iterdir() if p.name.startswith(task + "-"))
        want = _val_accuracy(dirs[task], head_dir, csv)
        assert fitness.scores(dirs[task])[task] == pytest.approx(want)
    acc = fitness.scores(dirs["mood"])
    assert fitness(dirs["mood"]) == pytest.approx(np.mean(list(acc.values())))


def test_cma_es_search_scored_by_the_bench(fitness, tmp_path):
    dirs = fitness.prepare(tmp_path / "models")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(dirs["base"]),
        "models": [
            {"model": str(dirs[t]), "parameters": {"weight": 0.5}} for t in ("mood", "topic")
        ],
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    genome = {
        "recipe": "recipe.yml",
        "search": [{"path": f"models.{i}.parameters.weight", "low": 0.0, "high": 2.0}
                   for i in (0, 1)],
        "trials": 6,
        "popsize": 3,
    }  # fmt: skip
    (tmp_path / "genome.yml").write_text(yaml.safe_dump(genome))
    rows = []
    s = evolve(tmp_path / "genome.yml", tmp_path / "study", fitness, executor="local",
               progress=rows.append)  # fmt: skip
    assert s["completed"] == 6 and s["best_fitness"] == max(r["fitness"] for r in rows)
    # the best recipe, merged again, scores what the search recorded
    from splice.merge import merge

    merge(yaml.safe_load((tmp_path / "study" / "best.yml").read_text()), tmp_path / "best")
    assert fitness(tmp_path / "best") == pytest.approx(s["best_fitness"])


def test_cli_bench_fitness_and_usage_errors(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    model_dir, paths = tiny
    study = tmp_path / "study"
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(study / "models" / t), "parameters": {"weight": 1.0}}
            for t in ("mood", "topic")
        ],
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    search = [{"path": "models.0.parameters.weight", "low": 0.1, "high": 1.0}]
    genome = {"recipe": "recipe.yml", "trials": 2, "popsize": 2, "search": search}
    (tmp_path / "genome.yml").write_text(yaml.safe_dump(genome))
    args = ["evolve", str(tmp_path / "genome.yml"), str(study), "--executor", "local"]
    bench = ["--bench", ",".join(paths), "--bench-model", str(model_dir), "--bench-steps", "20"]
    code, out, err = run_cli(monkeypatch, capsys, *args, *bench)
    assert code == 0, out + err
    assert "2 trials (0 failed)" in out and (study / "models" / "topic").is_dir()
    assert run_cli(monkeypatch, capsys, *args)[0] == 2  # neither --scorer nor --bench
    code, out, err = run_cli(monkeypatch, capsys, *args, *bench, "--scorer", "x.py:f")
    assert code == 2 and "exactly one of --scorer and --bench" in out + err
