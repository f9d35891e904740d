"""Same inputs + seed → identical SHA-256 of every output file, across runs and thread counts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from splice.io import CheckpointWriter

RECIPES = {
    "dare_ties": {"method": "dare", "params": {"p": 0.7, "consensus": "ties"}},
    "ties_global": {"method": "ties", "params": {"density": 0.3, "scope": "global"}},
    "ta_lines_auto": {
        "method": "task_arithmetic",
        "params": {"lambda": 0.5},
        "lines": {"beta": 0.6},
    },
    "pcb": {"method": "pcb", "params": {}},
}

CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from splice.merge import merge
for name, recipe in json.loads(sys.argv[2]).items():
    merge(recipe, sys.argv[3] + "/" + name, progress=False, max_shard_size="1MB")
"""


def _model(dest: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with CheckpointWriter(dest, max_shard_size="1MB") as w:
        for i in range(3):
            w.write(f"model.layers.{i}.mlp.weight", torch.randn(384, 512, generator=g))
            w.write(f"model.layers.{i}.norm.weight", torch.randn(512, generator=g))
        w.write("model.embed_tokens.weight", torch.randn(300, 512, generator=g))


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_outputs_are_byte_identical_across_runs_and_threads(tmp_path: Path) -> None:
    for i, name in enumerate(["base", "a", "b", "c"]):
        _model(tmp_path / name, i)
    recipes = {
        k: {
            **v,
            "base": str(tmp_path / "base"),
            "seed": 3,
            "models": [str(tmp_path / m) for m in "abc"],
        }
        for k, v in RECIPES.items()
    }
    runs = {}
    for label, threads in (("t1", 1), ("t2", 2), ("t1_again", 1)):
        out = tmp_path / label
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads), json.dumps(recipes), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[label] = _hashes(out)
    assert len(runs["t1"]) > 4 * 2  # several shards + index per recipe
    assert runs["t1"] == runs["t1_again"]
    assert runs["t1"] == runs["t2"]
