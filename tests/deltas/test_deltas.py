"""Static delta types: materialize, nbytes, save/load round trips, task vectors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splice.deltas import (
    Dense,
    LowRank,
    Masked,
    Sparse,
    load_deltas,
    lora_scale,
    save_deltas,
    task_vector,
)
from splice.errors import SpliceError


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_lora_scale_plain_and_rslora() -> None:
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 8, use_rslora=True) == pytest.approx(16 / math.sqrt(8))


def test_lowrank_materialize_matches_loop() -> None:
    b, a = torch.randn(5, 3, generator=_g()), torch.randn(3, 4, generator=_g())
    d = LowRank(b, a, scale=0.5)
    ref = torch.zeros(5, 4)
    for i in range(5):
        for j in range(4):
            ref[i, j] = 0.5 * sum(b[i, k] * a[k, j] for k in range(3))
    assert torch.allclose(d.materialize(), ref, atol=1e-6)
    assert d.shape == (5, 4) and d.rank == 3 and d.nbytes == (15 + 12) * 4
    assert torch.allclose(LowRank(b, a, 0.5, transpose=True).materialize(), ref.T, atol=1e-6)


def test_lowrank_conv_kernel_shape() -> None:
    a, b = torch.randn(2, 3, 3, 3, generator=_g()), torch.randn(8, 2, 1, 1, generator=_g())
    d = LowRank(b, a, 1.0, target_shape=(8, 3, 3, 3))
    w = d.materialize()
    assert w.shape == (8, 3, 3, 3)
    assert torch.allclose(w[1, 2], b[1, 0, 0, 0] * a[0, 2] + b[1, 1, 0, 0] * a[1, 2], atol=1e-6)


def test_masked_and_sparse_materialize() -> None:
    v = torch.randn(4, 5, generator=_g())
    mask = v > 0
    m = Masked(v, mask)
    assert torch.equal(m.materialize(), v * mask)
    s = Sparse.from_dense(m.materialize())
    assert torch.equal(s.materialize(), v * mask)
    assert s.nbytes == int(mask.sum()) * (8 + 4)
    with pytest.raises(SpliceError, match="bool mask"):
        Masked(v, mask.float())


def test_save_load_round_trip_every_kind(tmp_path: Path) -> None:
    g = _g()
    deltas = {
        "a.weight": Dense(torch.randn(3, 3, generator=g)),
        "b.weight": LowRank(
            torch.randn(4, 2, generator=g), torch.randn(2, 6, generator=g), 0.25, transpose=True
        ),
        "c.weight": Masked(torch.randn(5, generator=g), torch.tensor([1, 0, 1, 1, 0]).bool()),
        "d.weight": Sparse(torch.tensor([0, 5]), torch.tensor([1.5, -2.0]), (2, 3)),
    }
    path = save_deltas(deltas, tmp_path / "d.safetensors")
    back = load_deltas(path)
    assert set(back) == set(deltas)
    for name, d in deltas.items():
        assert type(back[name]) is type(d)
        assert torch.equal(back[name].materialize(), d.materialize())
        assert back[name].nbytes == d.nbytes
    assert back["b.weight"].scale == 0.25 and back["b.weight"].transpose


def test_load_deltas_refuses_plain_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(SpliceError, match="not a splice delta file"):
        load_deltas(tmp_path / "m.safetensors")


def test_task_vector_skips_integer_buffers_and_checks_shapes() -> None:
    base = {
        "w": torch.ones(2, 2),
        "ids": torch.arange(3),
        "bn.num_batches_tracked": torch.tensor(4),
    }
    tuned = {
        "w": torch.full((2, 2), 3.0),
        "ids": torch.arange(3) + 1,
        "bn.num_batches_tracked": torch.tensor(9),
    }
    tv = dict(task_vector(base, tuned))
    assert list(tv) == ["w"] and torch.equal(tv["w"].materialize(), torch.full((2, 2), 2.0))
    with pytest.raises(SpliceError, match="differs from base"):
        dict(task_vector(base, {**tuned, "w": torch.ones(3)}))
    with pytest.raises(SpliceError, match="missing"):
        dict(task_vector(base, {"ids": torch.arange(3)}))
    assert dict(task_vector(base, {"ids": torch.arange(3)}, strict=False)) == {}


def test_load_deltas_reads_switch_without_the_merge_stage(tmp_path: Path) -> None:
    import subprocess
    import sys

    from splice.merge.methods.tswitch import tswitch_compress

    base = {"w": torch.zeros(6, 5)}
    deltas = tswitch_compress(base, {"w": torch.randn(6, 5, generator=_g())}, density=0.5)
    save_deltas(deltas, tmp_path / "s.safetensors")
    code = (
        "import sys, torch; from splice.deltas import load_deltas\n"
        "assert 'splice.merge.methods.tswitch' not in sys.modules\n"
        f"d = load_deltas({str(tmp_path / 's.safetensors')!r})['w']\n"
        "assert not any(m.startswith('splice.merge') for m in sys.modules)\n"
        "print(type(d).__name__, float(d.materialize().abs().sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kind, total = out.stdout.split()
    assert kind == "Switch"
    assert float(total) == pytest.approx(float(deltas["w"].materialize().abs().sum()), rel=1e-6)
