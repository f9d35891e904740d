"""A quantized frozen base under trainable adapters (QLoRA-style; issue #28, deliverable 4).

:func:`quantize_base` turns every frozen ``Linear``/``Conv`` layer of a model — the base layers
inside :mod:`splice.adapters` wrappers included — into a frozen :class:`QuantLayer` with round-
to-nearest per-output-channel codes (uint8 codes, a step and a zero point per channel; the float
weight is dropped). Each forward dequantises the weight on the fly (``Δ·(q − z)``) — a Linear's
backward again, so no float weight lives between the two — so the adapters train on exactly the
weights a deployed quantized base computes with, and the codes never change: nothing of the base
is trainable. Layers with a trainable parameter (a new head, ``modules_to_save``) and embeddings
stay in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.compress.qlayer import QuantLayer, check_bits, quantizable, set_module, wrap
from splice.errors import SpliceError

__all__ = ["QuantLinear", "quantize_base"]


class _DequantLinear(torch.autograd.Function):
    """``x·(Δ(q − z))ᵀ + b`` that keeps the codes, not the float weight, for backward (the
    weight is dequantised again there): only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None):
        ctx.save_for_backward(q, scale, zero)
        w = scale * (q.to(scale.dtype) - zero)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, scale, zero = ctx.saved_tensors
        w = scale * (q.to(scale.dtype) - zero)
        return grad @ w.to(grad.dtype), None, None, None, None


class QuantLinear(QuantLayer):
    """A frozen quantized ``nn.Linear`` whose backward re-dequantises its weight, so a training
    step holds codes (one byte each) rather than float weights between forward and backward."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.frozen or args or kwargs:
            return super().forward(x, *args, **kwargs)
        q, s, z, b = self.qweight, self.weight_scale, self.weight_zero, self.base.bias
        return _DequantLinear.apply(x, q, s, z, b)


def quantize_base(model: nn.Module, bits: int) -> list[str]:
    """Quantize ``model``'s frozen Linear/Conv layers to ``bits`` in place; their names.

    Raises:
        SpliceError: ``bits`` outside 2–8, or no frozen layer to quantize.
    """
    check_bits(bits, "base bits")
    done = []
    for name in quantizable(model):
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding) or any(p.requires_grad for p in module.parameters()):
            continue
        if isinstance(module, nn.Linear):
            layer: QuantLayer = QuantLinear(module, bits, a_bits=None)
            set_module(model, name, layer)
        else:
            layer = wrap(model, name, bits, a_bits=None)
        layer.freeze()
        layer.requires_grad_(False)
        done.append(name)
    if not done:
        raise SpliceError("the model has no frozen Linear/Conv layer to quantize")
    return done
