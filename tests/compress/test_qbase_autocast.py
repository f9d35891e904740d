"""LoRA on a W4/W8 quantized base (``_DequantLinear``, the conv ``QuantLayer``) under the
training loop's bf16 autocast: the same gradients as fp32, and an actionable merge error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.adapters import inject, merge_adapters
from splice.compress import quant_layers, quantize_base
from splice.errors import SpliceError
from splice.train.loop import TrainStep


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Linear(8, 16),
            nn.Linear(16, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.conv(x).relu().mean((2, 3))).tanh())


def _grads(model: nn.Module, x: torch.Tensor, precision: str, loop: bool):
    """Gradients of a fixed random readout; the backward inside the autocast (as the loop
    runs it) or after it (no autocast in the backward: PyTorch's recommended pattern)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with TrainStep(loss=None, optimizer=None, precision=precision).autocast():  # type: ignore[arg-type]
        out = model(x)
        loss = (
            out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        ).sum()
        if loop:
            return out, params, torch.autograd.grad(loss, params)
    return out, params, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_base_under_bf16_autocast_matches_fp32(bits):
    torch.manual_seed(0)
    model = _Net().eval()
    inject(model, "lora", ["conv", "fc1", "fc2"], r=2)
    quantize_base(model, bits)
    kinds = sorted(type(q).__name__ for _, q in quant_layers(model))
    assert kinds == ["QuantLayer", "QuantLinear", "QuantLinear"]  # _DequantLinear and the conv
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init: B ≠ 0, so A has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(4, 3, 6, 6)
    _, params, want = _grads(model, x, "fp32", loop=False)
    for loop in (True, False):
        out, _, got = _grads(model, x, "bf16", loop)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        for p, a, b in zip(params, got, want, strict=True):
            assert a.dtype == p.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
    codes = {n: q.qweight.clone() for n, q in quant_layers(model)}
    with pytest.raises(SpliceError, match="holds no float weight"):
        merge_adapters(model)
    assert all(torch.equal(q.qweight, codes[n]) for n, q in quant_layers(model))


def test_dora_on_a_quantized_base_is_an_error_naming_the_fix():
    """DoRA reads the base weight (its column norms); a quantized base has none."""
    model = nn.Sequential(nn.Linear(8, 12))
    inject(model, "dora", ["0"], r=2)
    quantize_base(model, 4)
    with pytest.raises(SpliceError, match=r"holds no float weight.*\(LoRA, not DoRA\)"):
        model(torch.randn(3, 8))
