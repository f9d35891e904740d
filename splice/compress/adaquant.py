"""AdaQuant: per-layer reconstruction of the full-precision output (spec other.md §4.3).

For one :class:`~splice.compress.qlayer.QuantLayer` with cached inputs ``X`` and full-precision
outputs ``Y``, minimise ``‖g(Y) − g(Q_w(W)·Q_x(X) + b)‖²`` over the weights, the bias and both
quantizers' ranges and offsets, with Adam at the paper code's separate learning rates (weights
1e-5, bias 1e-3, input quantizer 1e-1, weight quantizer 1e-3; tuned there for 8-bit
MobileNet-V2/ResNet-50), each step on ``batch`` randomly drawn cached samples. ``g`` is ReLU
for layers a ReLU follows, else the identity. This file builds the problem; the steps are
taken by the one training loop (``splice.train.minimise``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor, nn

from splice._schema import Strict
from splice.compress.qlayer import QuantLayer

__all__ = ["AdaQuantConfig", "Rows", "adaquant_problem", "init_input_range", "layer_mse"]

MicroLoss = Callable[[int], tuple[Tensor, int]]


class AdaQuantConfig(Strict):
    """AdaQuant's optimiser settings (defaults: the paper's released code)."""

    iters: int = Field(1000, ge=0, description="optimizer steps per layer")
    batch: int = Field(50, ge=1, description="cached samples per step")
    lr_weight: float = Field(1e-5, gt=0, description="Adam LR of the weights")
    lr_bias: float = Field(1e-3, gt=0, description="Adam LR of the bias")
    lr_act: float = Field(1e-1, gt=0, description="Adam LR of the input quantizer's range/offset")
    lr_wquant: float = Field(1e-3, gt=0, description="Adam LR of the weight quantizer's params")
    seed: int = 0


class Rows:
    """Cached per-batch tensors seen as one tensor of units (rows for linear layers and
    embeddings, whole samples for convolutions) without concatenating them, so the cache is
    held once."""

    def __init__(self, layer: QuantLayer, ts: list[Tensor]) -> None:
        self.samples = sum(t.shape[0] for t in ts)
        if isinstance(layer.base, nn.Linear | nn.Embedding):
            ts = [t.reshape(-1, *t.shape[-1:] if t.is_floating_point() else ()) for t in ts]
        self.parts = ts
        ends = torch.tensor([t.shape[0] for t in ts]).cumsum(0)
        self.ends, self.starts = ends, ends - torch.tensor([t.shape[0] for t in ts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.parts) else 0

    def __getitem__(self, idx: Tensor) -> Tensor:
        """The units ``idx`` in ascending order of index (``torch.cat(units)[idx.sort()]``):
        the same order for inputs and outputs, and the loss of a draw does not depend on it."""
        ranked = idx.sort().values
        part = torch.bucketize(ranked, self.ends, right=True)
        counts = torch.bincount(part, minlength=len(self.parts)).tolist()
        local = (ranked - self.starts[part]).split(counts)
        dev = self.parts[0].device
        return torch.cat(
            [
                p.index_select(0, i.to(dev))
                for p, i, n in zip(self.parts, local, counts, strict=True)
                if n
            ]
        )


@torch.no_grad()
def init_input_range(layer: QuantLayer, xs: list[Tensor]) -> None:
    """The input quantizer's min/max from the calibration batches, averaged over batches."""
    if layer.aq is None or not xs or not xs[0].is_floating_point():
        return
    lo = torch.stack([x.min() for x in xs]).mean()
    hi = torch.stack([x.max() for x in xs]).mean()
    layer.aq.init_minmax(lo, hi)


def _g(relu: bool) -> Callable[[Tensor], Tensor]:
    return torch.relu if relu else (lambda t: t)


@torch.no_grad()
def layer_mse(layer: QuantLayer, xs: list[Tensor], ys: list[Tensor], relu: bool = False) -> float:
    """Mean squared error of the layer against the cached outputs, over all batches."""
    g, total, count = _g(relu), 0.0, 0
    for x, y in zip(xs, ys, strict=True):
        total += float(((g(layer(x)) - g(y)) ** 2).sum())
        count += y.numel()
    return total / max(count, 1)


def adaquant_problem(
    layer: QuantLayer,
    xs: list[Tensor],
    ys: list[Tensor],
    cfg: AdaQuantConfig | None = None,
    relu: bool = False,
) -> tuple[MicroLoss, torch.optim.Optimizer]:
    """``(loss of step i, Adam over the four parameter groups)`` for ``layer``; run
    ``cfg.iters`` steps of it. Initialises the input quantizer from ``xs`` first."""
    cfg = cfg or AdaQuantConfig()
    init_input_range(layer, xs)
    x, y = Rows(layer, xs), Rows(layer, ys)
    per = max(1, len(x) // max(x.samples, 1))  # units per sample (tokens of a sequence)
    draw = min(cfg.batch * per, len(x))
    gen = torch.Generator().manual_seed(cfg.seed)
    g = _g(relu)
    groups = [{"params": [layer.base.weight], "lr": cfg.lr_weight}]
    if getattr(layer.base, "bias", None) is not None:
        groups.append({"params": [layer.base.bias], "lr": cfg.lr_bias})
    groups.append({"params": list(layer.wq.parameters()), "lr": cfg.lr_wquant})
    if layer.aq is not None:
        groups.append({"params": list(layer.aq.parameters()), "lr": cfg.lr_act})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)

    def loss(step: int) -> tuple[Tensor, int]:
        idx = torch.randint(len(x), (draw,), generator=gen)
        out = layer(x[idx])
        return nn.functional.mse_loss(g(out), g(y[idx])), draw

    return loss, torch.optim.Adam(groups)
