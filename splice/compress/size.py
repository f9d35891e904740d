"""Model size in bits: quantized weights at their bits, one FP32 step and one 8-bit zero point
per channel (and per quantized input), every other parameter at 32 bits."""

from __future__ import annotations

from torch import nn

from splice.compress.qlayer import QuantLayer, quant_layers

__all__ = ["layer_weights", "model_bits"]

_ZERO_POINT = 8
_SCALE = 32


def layer_weights(layer: QuantLayer) -> int:
    """Number of weights of a quantized layer (frozen or not)."""
    return layer.qweight.numel() if layer.frozen else layer.base.weight.numel()


def model_bits(model: nn.Module, exclude_weights: bool = False) -> int:
    """Bits of ``model`` as stored; ``exclude_weights`` leaves out the quantized weights
    themselves (what a bit allocation does not choose)."""
    seen, total = set(), 0  # ids of the parameters counted (a tied LM head shares one)
    for _, layer in quant_layers(model):
        channels = layer.wq.range.shape[0]
        total += channels * (_SCALE + _ZERO_POINT) + (0 if layer.aq is None else _SCALE + 8)
        total += 0 if exclude_weights else layer_weights(layer) * layer.w_bits
        seen.update(id(p) for n, p in layer.named_parameters() if n != "base.bias")
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += 32 * p.numel()
    return total
