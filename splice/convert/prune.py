"""Depth pruning: keep a subset of a causal LM's decoder layers (the equal-size baseline of
spec peft.md §8 and a same-family student for cross-scale transfer).

``keep`` lists the layers to keep, in order; :func:`stepwise_layers` gives every ``B``-th
layer (the layers a stepwise-initialised recursive model starts from). Works on any model
whose layers are named ``model.layers.<i>.`` (the Llama family).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from torch import nn

from splice.errors import SpliceError

__all__ = ["depth_prune", "stepwise_layers"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def stepwise_layers(n_layers: int, keep: int) -> list[int]:
    """Every ``n_layers // keep``-th layer from the first: ``[0, B, 2B, …]``."""
    if keep < 1 or n_layers % keep:
        raise SpliceError(
            f"keeping {keep} of {n_layers} layers is not a whole stride",
            fix=f"choose a divisor of {n_layers}",
        )
    return list(range(0, n_layers, n_layers // keep))


def depth_prune(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the decoder layers ``keep`` (in that order)."""
    n = model.config.num_hidden_layers
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep:
        raise SpliceError(f"layers {bad or list(keep)} to keep are not in 0..{n - 1}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    out = type(model)(cfg)  # on CPU: its buffers (rotary frequencies) are set up
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, t in model.state_dict().items():
        match = _LAYER.match(name)
        if match is None:
            state[name] = t
        elif int(match[1]) in new_index:
            state[f"model.layers.{new_index[int(match[1])]}.{match[2]}"] = t
    out.load_state_dict(state)
    return out.eval()
