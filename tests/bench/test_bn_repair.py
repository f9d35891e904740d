"""Batch-norm repair in the benchmark (splice.bench.bn_repair, MergeSpec.repair_bn)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from splice.bench.bn_repair import BNRepair, repairer
from splice.bench.merging import MergeSpec


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x))))).mean((2, 3))


class _Images:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def eval_order(self) -> np.ndarray:
        return np.arange(len(self.x))

    def batch(self, idx, device):
        return self.x[torch.as_tensor(idx)].to(device)


class _Encoder:
    modality = "image"

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()

    def features(self, batch, weights=None, module=None):
        return functional_call(module or self.module, dict(weights or {}), (batch,))


def _suite(module: nn.Module):
    g = torch.Generator().manual_seed(0)
    val = {t: _Images(torch.randn(40, 3, 6, 6, generator=g) + shift) for t, shift in
           (("a", 0.0), ("b", 1.5))}  # fmt: skip
    return SimpleNamespace(
        encoder=_Encoder(module), val=val, data=dict.fromkeys(val), batch_size=16
    )


def _tuned(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p + 0.3 * torch.randn(p.shape, generator=g) for n, p in module.named_parameters()}


def test_a_fine_tune_repaired_to_itself_keeps_its_buffers_and_weights():
    torch.manual_seed(0)
    net = _Net()
    suite = _suite(net)
    own = {"a": _tuned(net, 1), "b": _tuned(net, 2)}
    out = BNRepair(suite, own)(own["a"], "a")
    for name in ("bn", "bn2"):
        for buf in ("running_mean", "running_var"):
            torch.testing.assert_close(
                out[f"{name}.{buf}"], getattr(net.get_submodule(name), buf), rtol=1e-5, atol=1e-6
            )
    assert all(out[n] is own["a"][n] for n in own["a"])  # weights untouched


def test_the_pooled_repair_moves_the_merge_toward_the_fine_tunes_features():
    torch.manual_seed(0)
    net = _Net()
    suite = _suite(net)
    own = {"a": _tuned(net, 1), "b": _tuned(net, 2)}
    merged = {n: own["a"][n] + own["b"][n] - p for n, p in net.named_parameters()}  # λ = 1
    fixed = BNRepair(suite, own)(merged)
    assert set(fixed) == set(merged) | {f"{b}.{s}" for b in ("bn", "bn2")
                                        for s in ("running_mean", "running_var")}  # fmt: skip

    def error(weights):
        total = 0.0
        for t in ("a", "b"):
            x = suite.val[t].x
            want = functional_call(net, own[t], (x,))
            total += (functional_call(net, weights, (x,)) - want).pow(2).mean().item()
        return total

    assert error(fixed) < 0.5 * error(merged)
    assert BNRepair(suite, own).buffer_count() == 2 * (6 + 4)


def test_no_repairer_without_batch_norm_or_without_a_spec_asking():
    plain = nn.Sequential(nn.Linear(3, 3))
    suite = SimpleNamespace(encoder=_Encoder(plain))
    spec = MergeSpec("task_arithmetic", repair_bn=True)
    assert repairer(suite, {}, [spec]) is None
    bn_suite = _suite(_Net())
    assert repairer(bn_suite, {}, [MergeSpec("task_arithmetic")]) is None
    assert isinstance(repairer(bn_suite, {}, [spec]), BNRepair)
    assert spec.key.endswith("+bn") and spec.label.endswith("+ BN repair")
    assert spec.resolved_key() != MergeSpec("task_arithmetic").resolved_key()
