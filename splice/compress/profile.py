"""The per-layer sensitivity table ``ΔL[ℓ, k]`` the bit allocation needs (spec other.md §4.4).

With every layer at its base-precision variant, switch layer ``ℓ`` alone to option ``k`` and
measure the calibration loss: ``ΔL = max(L(ℓ → k) − L_base, 1e-6)``; the base option itself is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from splice.compress.qlayer import QuantLayer

__all__ = ["Variants", "sensitivity"]

Variants = Mapping[str, Mapping[int, dict[str, Tensor | int]]]
"""Layer name → bits → that layer's :meth:`QuantLayer.state` at those bits."""


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    variants: Variants,
    options: Sequence[int],
    base_bits: int,
    evaluate: Callable[[nn.Module], float],
    on_layer: Callable[[int, str], None] | None = None,
) -> tuple[np.ndarray, float]:
    """``(ΔL table of layers × options in the order of variants, L_base)``; the model is left
    with every layer at ``base_bits``."""
    layers = {name: model.get_submodule(name) for name in variants}
    for name, layer in layers.items():
        assert isinstance(layer, QuantLayer)
        layer.load_state(variants[name][base_bits])
    base = evaluate(model)
    table = np.zeros((len(layers), len(options)))
    for i, (name, layer) in enumerate(layers.items()):
        for k, bits in enumerate(options):
            if bits == base_bits:
                continue
            layer.load_state(variants[name][bits])
            table[i, k] = max(evaluate(model) - base, 1e-6)
        layer.load_state(variants[name][base_bits])
        if on_layer is not None:
            on_layer(i, name)
    return table, base
