"""Lockstep capture: one forward per batch, paused at each layer, gives what fresh forwards
give; layers out of order fall back; errors reach the caller; nothing is left running."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from splice.compress import capture
from splice.compress.lockstep import Lockstep


def run(model, batch):
    return model(batch)


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_each_layer_comes_from_one_forward_per_batch(net, batches):
    calls = []
    net[0].register_forward_pre_hook(lambda *a: calls.append(1))
    names = ["0", "2", "4"]
    with Lockstep(net, names, batches, run, "after") as steps:
        for name in names:
            xs, ys = steps.take(name)
            ref_x, ref_y = capture(net, name, batches, run)  # fresh forwards, not paused
            assert all(torch.equal(a, b) for a, b in zip(xs + ys, ref_x + ref_y, strict=True))
            steps.release(name)
    assert len(calls) == 3 * len(batches) + len(batches)  # 3 fresh captures + 1 lockstep forward


def test_before_lets_the_caller_change_the_layer_first(net, batches):
    with Lockstep(net, ["2", "4"], batches, run) as steps:
        xs, ys = steps.take("2")
        assert ys == []
        with torch.no_grad():
            net[2].weight.zero_()  # the paused forwards run the changed layer
            net[2].bias.fill_(0.5)
        steps.release("2")
        xs, _ = steps.take("4")
    assert all(
        torch.allclose(x, torch.full_like(x, float(torch.tanh(torch.tensor(0.5))))) for x in xs
    )


def test_a_layer_out_of_order_gives_none_and_the_rest_still_comes(net, batches):
    with Lockstep(net, ["0", "2", "4"], batches, run, "after") as steps:
        assert steps.take("2") is None  # the forwards wait at "0"
        steps.release("2")
        steps.release("0")
        xs, ys = steps.take("4")  # "2" passes: released
        ref_x, ref_y = capture(net, "4", batches, run)
        assert all(torch.equal(a, b) for a, b in zip(xs + ys, ref_x + ref_y, strict=True))
        steps.release("4")
        assert steps.take("0") is None  # every forward has ended


def test_an_error_in_a_forward_reaches_the_caller_and_no_thread_is_left(net, batches):
    before = threading.active_count()
    bad = [*batches[:2], torch.randn(3, 7)]
    with Lockstep(net, ["2"], bad, run) as steps, pytest.raises(RuntimeError, match="shapes"):
        steps.take("2")
    with Lockstep(net, ["0", "2"], batches, run) as steps:
        steps.take("0")  # the forwards are paused when the block ends
    assert threading.active_count() == before
    net(batches[0])  # no hook left behind
