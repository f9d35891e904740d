"""EMR-Merging: election, exact reconstruction where possible, compact storage round-trip."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.merge.fusion.emr import EMRModel, emr_merge, pack_bits, unpack_bits


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_single_task_is_rebuilt_exactly():
    tau = {"w": _rand((5, 7), 0), "b": _rand((5,), 1)}
    emr = emr_merge({"only": tau})
    assert emr.scales["only"] == pytest.approx(1.0)
    for n, v in emr.task_vector("only").items():
        torch.testing.assert_close(v, tau[n])


def test_disjoint_supports_are_rebuilt_exactly():
    full = _rand((6, 8), 2)
    support = torch.arange(48).reshape(6, 8) % 3
    deltas = {f"t{k}": {"w": torch.where(support == k, full, 0.0)} for k in range(3)}
    emr = emr_merge(deltas)
    torch.testing.assert_close(emr.unified["w"], full)
    base = {"w": _rand((6, 8), 3)}
    for t, d in deltas.items():
        assert emr.scales[t] == pytest.approx(1.0)
        torch.testing.assert_close(emr.weights(base, t)["w"], base["w"] + d["w"])


def test_election_masks_and_rescalers_follow_the_definition():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([-4.0, -1.0, 1.0, 0.5])
    emr = emr_merge({"a": {"w": a}, "b": {"w": b}})
    # sign(a+b) = [-, -, +, +]; max agreeing magnitude = [4, 2, 3, 0.5]
    torch.testing.assert_close(emr.unified["w"], torch.tensor([-4.0, -2.0, 3.0, 0.5]))
    assert unpack_bits(emr.masks["a"]["w"], (4,)).tolist() == [False, True, True, True]
    assert emr.scales["a"] == pytest.approx(6.5 / 5.5)
    assert emr.scales["b"] == pytest.approx(6.5 / 9.5)


def test_storage_round_trip_is_compact(tmp_path):
    deltas = {t: {"w": _rand((64, 33), i), "v": _rand((10,), 10 + i)} for i, t in enumerate("xyz")}
    emr = emr_merge(deltas)
    emr.save(tmp_path / "emr")
    back = EMRModel.load(tmp_path / "emr")
    for t in "xyz":
        for n, v in emr.task_vector(t).items():
            torch.testing.assert_close(back.task_vector(t)[n], v)
    sizes = emr.nbytes()
    assert sizes["masks"] == 3 * (-(-64 * 33 // 8) + 2)  # packed bits per task
    mask = torch.rand(3, 11) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), (3, 11)), mask)
    with pytest.raises(SpliceError, match="not an EMR directory"):
        EMRModel.load(tmp_path)
    with pytest.raises(SpliceError, match="no task 'q'"):
        emr.task_vector("q")
