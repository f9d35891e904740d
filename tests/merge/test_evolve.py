"""splice evolve: CMA-ES improves a synthetic fitness, resumes after a kill, runs through
Ray, writes the best recipe; bad genomes are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splice.errors import SpliceError
from splice.merge.evolve import evolve
from tests.merge._ckpt import finetune, save, tiny_llama

NAME = "model.layers.1.mlp.up_proj.weight"
SCORER = f"""
import os
from pathlib import Path
import torch
from safetensors.torch import load_file

def score(model_dir):
    kill = os.environ.get("KILL_AT")
    if kill:
        n = Path(kill + ".count")
        c = int(n.read_text()) + 1 if n.exists() else 1
        n.write_text(str(c))
        if c == 3:
            os.kill(os.getpid(), 9)  # a kill in the middle of the search
    got = load_file(str(Path(model_dir) / "model.safetensors"))["{NAME}"]
    want = torch.load(Path(__file__).with_name("target.pt"))
    return -float((got - want).square().sum())
"""


@pytest.fixture
def setup(tmp_path):
    import torch

    base = tiny_llama(0)
    fts = [finetune(base, s) for s in range(2)]
    save(base, tmp_path / "base")
    for i, ft in enumerate(fts):
        save(ft, tmp_path / f"ft{i}")
    target = base[NAME] + 0.3 * (fts[0][NAME] - base[NAME]) + 0.7 * (fts[1][NAME] - base[NAME])
    torch.save(target, tmp_path / "target.pt")
    (tmp_path / "scorer.py").write_text(SCORER)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / "ft0"), "parameters": {"weight": 1.0}},
            {"model": str(tmp_path / "ft1"), "parameters": {"weight": 1.0}},
        ],
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    genome = {
        "recipe": "recipe.yml",
        "search": [
            {"path": "models.0.parameters.weight", "low": 0.0, "high": 1.0},
            {"path": "models.1.parameters.weight", "low": 0.0, "high": 1.0},
        ],
        "trials": 36,
        "popsize": 6,
        "seed": 2,
    }
    (tmp_path / "genome.yml").write_text(yaml.safe_dump(genome))
    return tmp_path


def test_cma_es_improves_the_fitness_and_writes_the_best_recipe(setup):
    rows = []
    s = evolve(
        setup / "genome.yml",
        setup / "study",
        f"{setup / 'scorer.py'}:score",
        executor="local",
        progress=rows.append,
    )
    assert s["completed"] == 36 and s["failed"] == 0
    fit = [r["fitness"] for r in rows]
    assert sum(fit[-6:]) > sum(fit[:6])  # the last generation beats the first on average
    w = s["best_params"]
    assert abs(w["models.0.parameters.weight"] - 0.3) < 0.15
    assert abs(w["models.1.parameters.weight"] - 0.7) < 0.15
    best = yaml.safe_load(Path(s["best_recipe"]).read_text())
    assert best["models"][1]["parameters"]["weight"] == w["models.1.parameters.weight"]
    assert not any((setup / "study" / "trials").iterdir())  # models deleted once scored


def test_resumes_after_a_kill(setup):
    code = (
        "from splice.merge.evolve import evolve; import sys; "
        "evolve(sys.argv[1], sys.argv[2], sys.argv[3], executor='local')"
    )
    args = [str(setup / "genome.yml"), str(setup / "study"), f"{setup / 'scorer.py'}:score"]
    env = {"KILL_AT": str(setup / "kill"), "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, timeout=300)
    assert proc.returncode == -9
    s = evolve(*args, executor="local")
    assert s["completed"] == 36 and s["failed"] == 1  # the trial the kill interrupted
    summary = json.loads((setup / "study" / "summary.json").read_text())
    assert summary["completed"] == 36


@pytest.mark.slow
def test_trials_run_through_a_local_ray(setup):
    import ray

    g = yaml.safe_load((setup / "genome.yml").read_text())
    (setup / "genome.yml").write_text(yaml.safe_dump({**g, "trials": 6}))
    try:
        s = evolve(setup / "genome.yml", setup / "study", f"{setup / 'scorer.py'}:score")
    finally:
        ray.shutdown()
    assert s["completed"] == 6


def test_bad_genomes(setup):
    good = (setup / "genome.yml").read_text()
    g = yaml.safe_load(good)
    g["search"][1]["path"] = "models.1.parameters.wieght"
    (setup / "genome.yml").write_text(yaml.safe_dump(g))
    with pytest.raises(SpliceError, match=r"genome\.yml:\d+: search path .*no 'wieght'"):
        evolve(setup / "genome.yml", setup / "s", f"{setup / 'scorer.py'}:score")
    (setup / "genome.yml").write_text(good)
    with pytest.raises(SpliceError, match="cannot load scorer"):
        evolve(setup / "genome.yml", setup / "s", "nowhere_mod:score")
