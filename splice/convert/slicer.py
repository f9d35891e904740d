"""Cross-model parameter slicer/injector (spec other.md §5.6 component 2): add a ΔW that is
zero except at selected rows or columns of named linears, through forward hooks, and merge
it into the stored weights explicitly.

A :class:`SliceDelta` names a linear of the student, the axis (``"rows"``: output neurons,
e.g. ``up_proj``; ``"cols"``: input dims, e.g. ``down_proj``/``o_proj``) and the indices; its
values come from a callable each forward (a fixed tensor or a hypernetwork), so gradients
reach whatever produced them while the student stays frozen. :func:`merge_slices` writes
``W += ΔW`` and removes the hooks: the saved model keeps the transfer (the released LaTen code
keeps ΔW in a non-persistent attribute, which a plain save drops — spec §5.3 [lib]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["SliceDelta", "attach_slices", "merge_slices"]


@dataclass
class SliceDelta:
    """ΔW of ``module`` (a dotted name): ``values()`` gives ``(len(index), d_in)`` for rows,
    ``(d_out, len(index))`` for cols."""

    module: str
    axis: Literal["rows", "cols"]
    index: Tensor
    values: Callable[[], Tensor]
    handle: object | None = field(default=None, repr=False)

    def dense(self, weight: Tensor) -> Tensor:
        """The full ΔW, shaped like ``weight``."""
        delta = torch.zeros_like(weight, dtype=torch.float32)
        v = self.values().float()
        if self.axis == "rows":
            return delta.index_add(0, self.index, v)
        return delta.index_add(1, self.index, v)


def attach_slices(model: nn.Module, slices: list[SliceDelta]) -> None:
    """Hook every slice's linear: ``y += x ΔWᵀ`` (only the sliced part is computed)."""
    modules = dict(model.named_modules())
    for s in slices:
        linear = modules[s.module]

        def hook(module, args, out, s=s):
            x, v = args[0], s.values().to(out.dtype)
            if s.axis == "rows":  # extra output on the selected neurons
                extra = torch.zeros_like(out)
                return out + extra.index_add(-1, s.index, x @ v.T)
            return out + x.index_select(-1, s.index) @ v.T  # from the selected inputs

        s.handle = linear.register_forward_hook(hook)


@torch.no_grad()
def merge_slices(model: nn.Module, slices: list[SliceDelta]) -> None:
    """``W += ΔW`` for every slice, then remove its hook (the model now stores the transfer)."""
    modules = dict(model.named_modules())
    for s in slices:
        linear = modules[s.module]
        linear.weight += s.dense(linear.weight).to(linear.weight.dtype)
        if s.handle is not None:
            s.handle.remove()
            s.handle = None
