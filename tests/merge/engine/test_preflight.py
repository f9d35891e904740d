"""Preflight: the whole recipe is checked from headers and configs before any tensor is read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import splice.io.checkpoint as checkpoint_module
from splice.errors import SpliceError
from splice.io import CheckpointWriter, open_checkpoint
from splice.merge import merge
from tests.merge._ckpt import config, finetune, save, tiny_llama
from tests.merge._hf import tiny_hf


@pytest.fixture
def no_reads(monkeypatch):
    """Any tensor read fails the test: preflight errors must come from headers alone."""

    def refuse(info):
        raise AssertionError(f"tensor {info.name} was read before the preflight error")

    monkeypatch.setattr(checkpoint_module, "read_tensor", refuse)


def _inputs(root: Path, mib_per_model: int, seed: int = 0) -> list[Path]:
    """A base and three fine-tunes of ``mib_per_model`` MiB of random fp32 each; the last
    fine-tune's last tensor has one extra column."""
    g = torch.Generator().manual_seed(seed)
    n_tensors = 16
    rows = mib_per_model * (1 << 20) // 4 // n_tensors // 1024
    paths = []
    for m in range(4):
        path = root / ("base" if m == 0 else f"ft{m}")
        with CheckpointWriter(path, max_shard_size="128MB") as w:
            for i in range(n_tensors):
                cols = 1025 if (m == 3 and i == n_tensors - 1) else 1024
                w.write(f"model.layers.{i}.mlp.weight", torch.randn(rows, cols, generator=g))
        paths.append(path)
    return paths


def _shape_mismatch_fails_fast(root: Path, mib_per_model: int) -> float:
    base, *fts = _inputs(root, mib_per_model)
    size = sum(open_checkpoint(p).total_bytes for p in (base, *fts))
    assert size >= 4 * mib_per_model * (1 << 20) * 0.99
    recipe = {"method": "ties", "base": str(base), "models": [str(p) for p in fts]}
    start = time.perf_counter()
    with pytest.raises(SpliceError) as e:
        merge(recipe, root / "out")
    elapsed = time.perf_counter() - start
    msg = str(e.value)
    assert str(fts[-1]) in msg and "model.layers.15.mlp.weight" in msg and "fix:" in msg
    assert "shape" in msg and "\n" not in msg
    assert not (root / "out").exists()
    return elapsed


def test_last_model_shape_mismatch_fails_in_under_2s(tmp_path, no_reads):
    assert _shape_mismatch_fails_fast(tmp_path, 16) < 2.0


@pytest.mark.slow
def test_last_model_shape_mismatch_fails_in_under_2s_on_1gb(tmp_path, no_reads):
    assert _shape_mismatch_fails_fast(tmp_path, 256) < 2.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    base = tiny_llama(0)
    save(base, root / "base")
    save(finetune(base, 1), root / "ft1")
    return root, base


def _recipe(root: Path, *models: str, **kw) -> dict:
    return {
        "method": "ties",
        "base": str(root / "base"),
        "models": [str(root / m) for m in models],
        **kw,
    }


def test_per_tensor_parameter_ranges_name_model_and_tensor(llama, tmp_path, no_reads):
    root, _ = llama
    recipe = _recipe(root, "ft1", "ft1")
    recipe["models"][1] = {
        "path": recipe["models"][1],
        "params": {"density": {"gradient": [0.5, 1.5]}},
    }
    with pytest.raises(SpliceError) as e:
        merge({**recipe, "params": {"scope": "tensor"}}, tmp_path / "out")
    msg = str(e.value)
    # depth 0.5 gives density 1.0 (allowed); the last block's 1.5 is refused
    assert f"{root / 'ft1'}: model.layers.2." in msg and "density" in msg and "fix:" in msg


def test_layer_count_dtype_and_quantized_inputs_are_refused(llama, tmp_path, no_reads):
    root, base = llama
    short = {k: v for k, v in base.items() if "layers.2." not in k}
    save(short, tmp_path / "short", cfg=config(layers=3))
    ints = dict(finetune(base, 2))
    ints["model.norm.weight"] = torch.ones(8, dtype=torch.int32)
    save(ints, tmp_path / "ints")
    quant = {**config(), "quantization_config": {"quant_method": "gptq", "bits": 4}}
    save(finetune(base, 3), tmp_path / "gptq", cfg=quant)
    cases = [
        ("short", r"num_hidden_layers=3 but the tensor names give 2 blocks .*\[2\] missing"),
        ("ints", "model.norm.weight: dtype torch.int32 here"),
        ("gptq", "gptq-quantized"),
    ]
    for name, message in cases:
        recipe = {**_recipe(root, "ft1"), "models": [str(root / "ft1"), str(tmp_path / name)]}
        with pytest.raises(SpliceError, match=message) as e:
            merge(recipe, tmp_path / "out")
        assert str(tmp_path / name) in str(e.value) and "fix:" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_integer_buffers_that_differ_fail_unless_allow_missing(llama, tmp_path):
    root, base = llama
    odd = finetune(base, 4)
    odd["model.steps"] = torch.arange(5) * 2
    save(odd, tmp_path / "odd")
    recipe = {**_recipe(root), "models": [str(root / "ft1"), str(tmp_path / "odd")]}
    with pytest.raises(SpliceError, match=r"model\.steps: integer tensor differs") as e:
        merge(recipe, tmp_path / "out")
    assert "--allow-missing" in str(e.value)
    out = merge(recipe, tmp_path / "out", allow_missing=True)
    ledger = json.loads((out / "splice-ledger.json").read_text())
    entry = next(t for t in ledger["tensors"] if t["name"] == "model.steps")
    assert entry["action"] == "copied" and str(tmp_path / "odd") in entry["reason"]
    assert torch.equal(open_checkpoint(out)["model.steps"], base["model.steps"])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    tiny_hf("gpt2", root / "tied_base", seed=0)
    tiny_hf("gpt2", root / "tied_ft", seed=1)
    tiny_hf("gpt2", root / "untied_ft", seed=2, tie_word_embeddings=False)
    return root


def _ta(root: Path, base: str, *models: str, out: Path) -> Path:
    recipe = {
        "method": "task_arithmetic",
        "base": str(root / base),
        "models": [str(root / m) for m in models],
        "params": {"lambda": 0.5},
    }
    return merge(recipe, out)


def test_tied_embeddings_merge_once_and_stay_tied(gpt2, tmp_path):
    out = _ta(gpt2, "tied_base", "tied_ft", out=tmp_path / "out")
    got = open_checkpoint(out)
    assert "lm_head.weight" not in got
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True)
    base, ft = open_checkpoint(gpt2 / "tied_base"), open_checkpoint(gpt2 / "tied_ft")
    wte = "transformer.wte.weight"
    torch.testing.assert_close(got[wte], base[wte] + 0.5 * (ft[wte] - base[wte]))


@pytest.mark.parametrize(("base", "other"), [("tied_base", "untied_ft"), ("untied_ft", "tied_ft")])
def test_a_tied_input_lends_its_embedding_as_the_head(gpt2, tmp_path, base, other):
    """mergekit #424: 'lm_head.weight required but not present' — here the tied input's
    head is its embedding, read in its place, and the ledger says so."""
    out = _ta(gpt2, base, other, out=tmp_path / "out")
    got = open_checkpoint(out)
    b, o = open_checkpoint(gpt2 / base), open_checkpoint(gpt2 / other)

    def head(c):
        return c["lm_head.weight"] if "lm_head.weight" in c else c["transformer.wte.weight"]

    torch.testing.assert_close(got["lm_head.weight"], head(b) + 0.5 * (head(o) - head(b)))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ledger = json.loads((out / "splice-ledger.json").read_text())
    entry = next(t for t in ledger["tensors"] if t["name"] == "lm_head.weight")
    assert "ties it to transformer.wte.weight" in " ".join(entry["notes"])
    tied = str(gpt2 / ("tied_base" if base == "tied_base" else other))
    assert entry["inputs"][tied] == "transformer.wte.weight"


FOOTPRINT = """
import json, sys
from splice.merge import plan_merge
from splice.merge.engine.memory import process_rss
plan = plan_merge(json.loads(sys.argv[1]))["plan"]
assert "torch" not in sys.modules, "planning imported torch"
import torch
print(json.dumps({"planned": plan["baseline_ram"], "with_torch": process_rss()}))
"""


def test_a_plan_without_torch_counts_what_importing_it_adds(llama):
    """``--plan`` never imports torch, the merge does: the plan's process footprint is this
    process plus :data:`TORCH_IMPORT_BYTES`, which must cover what ``import torch`` really
    adds here, with at most 15 % to spare."""
    import subprocess
    import sys

    root, _ = llama
    recipe = json.dumps(_recipe(root, "ft1"))
    done = subprocess.run(
        [sys.executable, "-c", FOOTPRINT, recipe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert r["with_torch"] <= r["planned"] <= 1.15 * r["with_torch"], r
