"""Fidelity check after every merge: NaN/Inf scan of the output, relative change vs the base."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml

from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.merge import merge
from tests.merge._ckpt import finetune, save, tiny_llama


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    base = tiny_llama(0)
    save(base, root / "base")
    save(finetune(base, 1, scale=0.3), root / "ft1")
    save(finetune(base, 2, scale=0.1), root / "ft2")
    return root, base


def _recipe(root, **kw):
    return {
        "method": "task_arithmetic",
        "base": str(root / "base"),
        "models": [str(root / "ft1"), str(root / "ft2")],
        **kw,
    }


def test_relative_change_matches_an_independent_computation(disk, tmp_path):
    root, base = disk
    out = merge(_recipe(root, params={"lambda": 0.7}), tmp_path / "out")
    got = open_checkpoint(out)
    fid = json.loads((out / "splice-ledger.json").read_text())["fidelity"]
    rel = {
        n: float((got[n].double() - b.double()).norm() / b.double().norm())
        for n, b in base.items()
        if b.is_floating_point()
    }
    num = sum(
        float((got[n].double() - b.double()).norm() ** 2) for n, b in base.items() if n in rel
    )
    den = sum(float(b.double().norm() ** 2) for n, b in base.items() if n in rel)
    assert fid["tensors_checked"] == len(rel) and fid["nonfinite"] == 0
    assert fid["relative_change"] == pytest.approx(math.sqrt(num / den), rel=1e-5)
    worst = max(rel, key=rel.__getitem__)
    assert fid["max"]["tensor"] == worst
    assert fid["max"]["value"] == pytest.approx(rel[worst], rel=1e-5)
    attn = [v for n, v in rel.items() if "self_attn" in n]
    assert fid["by_block"]["attn"] == pytest.approx(sum(attn) / len(attn), rel=1e-5)


def test_an_overflowing_output_fails_before_commit(disk, tmp_path):
    root, _ = disk
    recipe = _recipe(root, params={"lambda": 1e6}, out_dtype="float16")
    with pytest.raises(SpliceError, match=r"NaN or Inf.*inputs were finite.*float16") as e:
        merge(recipe, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    merge({**recipe, "out_dtype": "bfloat16"}, tmp_path / "out")  # bf16 has fp32's range


def test_cli_shows_the_summary(disk, tmp_path, monkeypatch, capsys):
    from splice.cli import main

    root, _ = disk
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(root)))
    monkeypatch.setattr(sys, "argv", ["splice", "merge", str(path), str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert (e.value.code or 0) == 0
    assert "ledger: 75 input tensors of 3 inputs accounted for (0 dropped)" in out
    assert "fidelity: 24 tensors finite; ‖θ−θ₀‖/‖θ₀‖ = " in out
    monkeypatch.setattr(sys, "argv", ["splice", "merge", str(path), str(tmp_path / "j"), "--json"])
    with pytest.raises(SystemExit):
        main()
    summary = json.loads(capsys.readouterr().out)["ledger"]
    assert summary["fidelity"]["relative_change"] > 0 and summary["dropped"] == 0
    assert torch.equal(open_checkpoint(tmp_path / "o")["model.steps"], torch.arange(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sums_widen_chunk_by_chunk_and_match_float64(dtype, monkeypatch):
    import splice.merge.output.fidelity as fidelity

    monkeypatch.setattr(fidelity, "CHUNK", 1000)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 101, generator=g)
    out = (base + 0.1 * torch.randn(37, 101, generator=g)).to(dtype)
    finite, sq_diff, sq_base = fidelity._sums(out, base)
    ref_diff = float(((out.double() - base.double()) ** 2).sum())
    assert finite
    assert sq_diff == pytest.approx(ref_diff, rel=1e-5)
    assert sq_base == pytest.approx(float((base.double() ** 2).sum()), rel=1e-5)
    assert fidelity._sums(out, None)[0]


def test_sums_tell_an_overflowing_sum_from_a_non_finite_value(monkeypatch):
    import splice.merge.output.fidelity as fidelity

    monkeypatch.setattr(fidelity, "CHUNK", 4)
    big = torch.full((10,), 3e38)  # finite, but any sum of two overflows float32
    assert fidelity._sums(big, None)[0]
    assert fidelity._sums(big, torch.zeros(10))[0]
    bad = big.clone()
    bad[7] = float("inf")
    assert not fidelity._sums(bad, None)[0]
    assert not fidelity._sums(bad, torch.zeros(10))[0]
