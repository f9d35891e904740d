"""Which named adapters act, model-wide: the state the adapted layers of one model share.

:class:`_Bank` holds the loaded names, the active set and, during a mixed batch, the row
routing (:class:`Rows`). ``model(x, adapter_names=[…])`` works on any module that holds
adapters through a forward pre-hook that turns the keyword into a :class:`Rows` for that call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.errors import SpliceError

__all__ = ["BASE", "DEFAULT", "Rows", "banks", "rows_for"]

DEFAULT = "default"  # the name ``inject`` and ``load_adapter`` give an adapter
BASE = "base"  # a row routed here gets no adapter (mixed batches)
KEYWORD = "adapter_names"


@dataclass
class _Bank:
    """The adapter state one model's adapted layers share: the names loaded (in load order),
    the active set ``(name, weight)`` and, while a mixed batch runs, its row routing."""

    names: list[str]
    active: tuple[tuple[str, float], ...]
    rows: Rows | None = None


class Rows:
    """Which adapters act on which rows (dim 0) of a batch: an index or per-row weights.

    ``Rows(slots, index=i)``: row n gets adapter ``slots[i[n]]`` (``"base"``: none); rows are
    grouped by adapter, each group runs through its adapter's own forward, and the groups are
    put back in order — one gather and one scatter per layer, whatever the number of adapters.
    ``Rows(slots, weights=w)``: row n gets Σ_k w[n, k]·(adapter k's change), each adapter run on
    the whole batch (per-sample mixtures). ``Rows.from_names(["a", "base", "b", …])`` builds the
    index form from one name per row. The same object serves any per-row choice of adapter
    (a loop depth, a hypernetwork's per-sample weights): it is a row → slot tensor.
    """

    def __init__(
        self, slots: Sequence[str], index: Tensor | None = None, weights: Tensor | None = None
    ) -> None:
        if (index is None) == (weights is None):
            raise SpliceError("Rows takes an index or weights, not both or neither")
        self.slots = tuple(slots)
        self.index = index
        self.weights = weights
        self._last: tuple[Tensor, int, Tensor] | None = None
        if index is not None:
            index = index.reshape(-1).long().cpu()
            if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < len(self.slots):
                raise SpliceError(
                    f"row index outside 0..{len(self.slots) - 1}", fix="index into slots"
                )
            self.n = index.numel()
            order = torch.argsort(index, stable=True)
            counts = torch.bincount(index, minlength=len(self.slots)).tolist()
            bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
            self.spans = [
                (name, bounds[k], bounds[k + 1]) for k, name in enumerate(self.slots) if counts[k]
            ]
            self.sorted = bool(torch.equal(order, torch.arange(self.n)))
            self._order = {"cpu": (order, torch.argsort(order))}
        else:
            if weights.dim() != 2 or weights.shape[1] != len(self.slots):
                shape = tuple(weights.shape)
                raise SpliceError(f"row weights {shape}; expected (rows, {len(self.slots)})")
            self.n = weights.shape[0]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Rows:
        """One adapter name per row (``"base"`` for none)."""
        slots = list(dict.fromkeys(names))
        return cls(slots, index=torch.tensor([slots.index(n) for n in names], dtype=torch.long))

    def gather(self, x: Tensor, order: Tensor) -> Tensor:
        """``x`` with its rows sorted by slot; the last input is reused (query, key and value
        projections read the same hidden states) while it is unchanged: same tensor, same
        version counter. Tensors made under ``torch.inference_mode`` have no version counter;
        for them the storage pointer stands in, which misses an in-place change between two
        projections of one input (no transformers model makes one)."""
        version = x.data_ptr() if x.is_inference() else x._version
        last = self._last
        if last is not None and last[0] is x and last[1] == version:
            return last[2]
        xs = x.index_select(0, order)
        self._last = (x, version, xs)
        return xs

    def order(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(rows sorted by slot, its inverse) on ``device``, moved there once."""
        key = str(device)
        if key not in self._order:
            self._order[key] = tuple(t.to(device) for t in self._order["cpu"])
        return self._order[key]


def banks(model: nn.Module) -> list[_Bank]:
    """The adapter banks inside ``model`` (one per model that adapters were added to)."""
    found: dict[int, _Bank] = {}
    for m in model.modules():
        bank = getattr(m, "_bank", None)
        if isinstance(bank, _Bank):
            found.setdefault(id(bank), bank)
    return list(found.values())


def rows_for(bank: _Bank, rows: Rows | Sequence[str]) -> Rows:
    """``rows`` (or one adapter name per row) checked against the adapters loaded."""
    if not isinstance(rows, Rows):
        if isinstance(rows, str) or not all(isinstance(n, str) for n in rows):
            raise SpliceError(
                f"adapter_names must be a list of names, one per row, got {rows!r}",
                fix="e.g. adapter_names=['a', 'base', 'b']",
            )
        rows = Rows.from_names(rows)
    unknown = [n for n in rows.slots if n != BASE and n not in bank.names]
    if unknown:
        raise SpliceError(
            f"adapter_names names {unknown[0]!r}, which is not loaded",
            fix=f"use one of {[*bank.names, BASE]}",
        )
    return rows


def _take_keyword(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    if KEYWORD not in kwargs:
        return None
    names = kwargs.pop(KEYWORD)
    if names is not None:
        for bank in banks(module):
            bank.rows = rows_for(bank, names)
        module._splice_rows_call = True
    return args, kwargs


def _clear_keyword(module: nn.Module, args: tuple, output: Any) -> None:
    if module.__dict__.pop("_splice_rows_call", False):
        for bank in banks(module):
            bank.rows = None


def hooks(model: nn.Module, add: bool) -> None:
    """Install (or remove) the ``adapter_names=`` keyword on ``model``'s forward."""
    pre, post = model._forward_pre_hooks, model._forward_hooks
    for table, fn in ((pre, _take_keyword), (post, _clear_keyword)):
        for key in [k for k, f in table.items() if f is fn]:
            del table[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
    if add:
        model.register_forward_pre_hook(_take_keyword, with_kwargs=True)
        model.register_forward_hook(_clear_keyword, always_call=True)
