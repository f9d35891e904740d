"""Activation capture by forward hooks: one layer's inputs and outputs over the calibration
batches (spec other.md §4.9 a).

The forward stops right after the captured layer ran (the hook raises), so capturing layer ``ℓ``
costs the network up to ``ℓ``, and only one layer's activations are held at a time. Sequential
AdaQuant captures inputs from the partly quantized model and targets from the full-precision
one, on every batch. [lib] splice.probe will hold the library's general hooks; this small
capture should move onto them once both exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Forward", "capture", "execution_order"]

Forward = Callable[[nn.Module, Any], Any]
"""Runs ``model`` on one calibration batch (the caller knows the batch's shape)."""


class _Stop(Exception):
    """Raised by a capture hook to end the forward once the layer has run."""


@torch.no_grad()
def capture(
    model: nn.Module,
    name: str,
    batches: Iterable[Any],
    forward: Forward,
    *,
    inputs: bool = True,
    outputs: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """``(inputs, outputs)`` of the submodule ``name``, one tensor per batch (first positional
    input; the output tensor). The forward is cut short after the layer."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        if inputs:
            xs.append(args[0].detach())
        if outputs:
            ys.append(out.detach())
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                forward(model, batch)
    finally:
        handle.remove()
    return xs, ys


@torch.no_grad()
def execution_order(model: nn.Module, names: list[str], batch: Any, forward: Forward) -> list[str]:
    """``names`` in the order their modules first run on ``batch``; never-run ones dropped."""
    seen: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.append(n) if n not in seen else None
        )
        for n in names
    ]
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen
