"""A quantized frozen base under trainable adapters (QLoRA-style; issue #28, deliverable 4).

:func:`quantize_base` turns every frozen ``Linear``/``Conv`` layer of a model — the base
layers inside :mod:`splice.adapters` wrappers included — into a frozen :class:`QuantLayer`
with round-to-nearest per-output-channel codes (uint8 codes, a step and a zero point per
channel; the float weight is dropped). Each forward dequantises the weight on the fly
(``Δ·(q − z)``), so the adapters train on exactly the weights a deployed quantized base
computes with, and the codes never change: nothing of the base is trainable. Layers with a
trainable parameter (a new head, ``modules_to_save``) and embeddings stay in float.
"""

from __future__ import annotations

from torch import nn

from splice.compress.qlayer import QuantLayer, check_bits, quantizable, wrap
from splice.errors import SpliceError

__all__ = ["quantize_base"]


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
        layer: QuantLayer = wrap(model, name, bits, a_bits=None)
        layer.freeze()
        layer.requires_grad_(False)
        done.append(name)
    if not done:
        raise SpliceError("the model has no frozen Linear/Conv layer to quantize")
    return done
