"""Bias tuning after quantization (spec other.md §4.6): KL to the full-precision logits, and
the mean-shift correction.

:func:`bias_problem` trains only the bias vectors (the classifier's excluded) to minimise
``KL(softmax(z_FP) ‖ softmax(z_Q))`` with SGD at LR 0.1 (the released code's effective
schedule). [lib] The target is the FP model's logits on the same inputs (label-free), not the
paper code's per-class stored embedding. :func:`mean_shift` subtracts each layer's
per-channel output shift ``E[y_Q] − E[y_FP]`` from its bias, layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.compress.capture import Forward, capture
from splice.compress.qlayer import quant_layers

__all__ = ["bias_parameters", "bias_problem", "kl_to_target", "mean_shift"]

MicroLoss = Callable[[int], tuple[Tensor, int]]


def kl_to_target(logits: Tensor, target: Tensor) -> Tensor:
    """``KL(softmax(target) ‖ softmax(logits))``, averaged over rows (all leading dims)."""
    logp = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1)
    logt = torch.log_softmax(target.float().reshape(-1, target.shape[-1]), -1)
    return (logt.exp() * (logt - logp)).sum(-1).mean()


def bias_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> list[nn.Parameter]:
    """The bias vectors of the quantized layers and of the batch norms (the bias a folded
    conv would have), except those of the layers named in ``exclude``."""
    out = [
        layer.base.bias
        for name, layer in quant_layers(model)
        if getattr(layer.base, "bias", None) is not None and name not in exclude
    ]
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    out += [m.bias for m in model.modules() if isinstance(m, norms) and m.bias is not None]
    return out


def bias_problem(
    model: nn.Module,
    batches: Sequence[Any],
    targets: Sequence[Tensor],
    forward: Forward,
    *,
    exclude: Sequence[str] = (),
    lr: float = 0.1,
) -> tuple[MicroLoss, torch.optim.Optimizer]:
    """``(loss of step i, SGD over the biases)``: step ``i`` uses batch ``i mod len``, whose FP
    logits are ``targets[i mod len]``. Everything else is frozen."""
    params = bias_parameters(model, exclude)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def loss(step: int) -> tuple[Tensor, int]:
        i = step % len(batches)
        out = forward(model, batches[i])
        return kl_to_target(out, targets[i]), int(targets[i].shape[0])

    return loss, torch.optim.SGD(params, lr=lr)


def _channel_mean(ys: list[Tensor], conv: bool) -> Tensor:
    if conv:  # (B, C, ...) → per channel C
        return torch.stack([y.transpose(0, 1).reshape(y.shape[1], -1).mean(1) for y in ys]).mean(0)
    return torch.stack([y.reshape(-1, y.shape[-1]).mean(0) for y in ys]).mean(0)


@torch.no_grad()
def mean_shift(
    model: nn.Module,
    reference: nn.Module,
    batches: Sequence[Any],
    forward: Forward,
    *,
    scale: float = 1.0,
) -> int:
    """Subtract ``scale · (E[y_Q] − E[y_FP])`` from each quantized layer's bias, in layer
    order; ``reference`` is the FP model (same layer names). Returns the layers corrected."""
    done = 0
    for name, layer in quant_layers(model):
        bias = getattr(layer.base, "bias", None)
        if bias is None or isinstance(layer.base, nn.Embedding):
            continue
        conv = not isinstance(layer.base, nn.Linear)
        _, yq = capture(model, name, batches, forward, inputs=False)
        _, yf = capture(reference, name, batches, forward, inputs=False)
        bias.sub_(scale * (_channel_mean(yq, conv) - _channel_mean(yf, conv)))
        done += 1
    return done
