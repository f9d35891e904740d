"""The adapted layer and the adapter base class (the method protocol and the registry are in
:mod:`._method`, re-exported here).

An adapter describes its change as ΔW = s·B@A (spec peft.md §22.1 with the ``add`` composer);
the layer's :class:`~splice.adapters._sites.Site` maps that onto Linear, Conv, Embedding or
GPT-2 ``Conv1D`` geometry. :class:`AdaptedLayer` holds a frozen base layer and one or more
named method :class:`Adapter` s; which of them act is model-wide state (:class:`_Bank`): an
active set (one adapter, or a weighted sum of several) or a per-row routing (:class:`Rows`,
mixed batches). Both only call each adapter's own ``forward(x, y)``, so every method works
with several adapters without code of its own. A method is one file that registers a
:class:`Method` in :data:`METHODS`; nothing here changes when a method is added.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.deltas import Delta, Dense
from splice.errors import SpliceError

from ._method import FAMILIES, METHODS, Method, MethodConfig, _Record
from ._routing import BASE, DEFAULT, Rows, _Bank
from ._sites import Site

__all__ = [
    "BASE",
    "DEFAULT",
    "FAMILIES",
    "METHODS",
    "AdaptedLayer",
    "Adapter",
    "Method",
    "MethodConfig",
    "Rows",
]


class Adapter(nn.Module):
    """One site's trainable change ΔW = scale·B@A. Subclasses implement :meth:`factors`.

    A method whose change is not additive (DoRA rescales, IA³ scales, OFT rotates the base
    weight) sets ``reads_base`` and implements :meth:`merged` and :meth:`unmerged` on the base
    (weight, bias) instead; one that must see the input before the base layer does (IA³ on a
    feed-forward layer, OFT) sets ``wraps_base`` and implements :meth:`around`; one whose
    :meth:`around` is only a faster form of ``forward(x, base(x))`` sets ``fuses_base`` (used
    when it acts alone; mixed and routed batches reuse the base output).
    """

    reads_base: ClassVar[bool] = False
    wraps_base: ClassVar[bool] = False
    fuses_base: ClassVar[bool] = False

    def __init__(self, site: Site, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.site = site
        self.scale = scale
        use_dropout = dropout > 0 and site.takes_dropout
        self.dropout = nn.Dropout(dropout) if use_dropout else nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)``: B (d_out, R), A (R, d_in) in the canonical layout."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Add the adapter's contribution to the base output ``y`` of input ``x``."""
        B, A = self.factors()
        return self.site.up_add(y, self.site.down(self.dropout(x), A), B, self.scale)

    def delta(self) -> Delta:
        B, A = self.factors()
        return self.site.lowrank(B.detach(), A.detach(), self.scale)

    def bind(self, base_layer: nn.Module) -> None:
        """Remember the base layer (not as a submodule: its weights stay out of the state);
        called once with the frozen base layer (methods that read W₀ override it: R-AMT)."""
        self._base = (base_layer,)

    def base(self) -> tuple[Tensor, Tensor | None]:
        """The base layer's (weight, bias) as stored."""
        layer = self._base[0]
        return self.site.weight(layer), getattr(layer, "bias", None)

    def around(self, base: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The adapted output when ``wraps_base``: the method calls ``base`` itself."""
        return self(x, base(x, *args, **kwargs))

    def merged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``reads_base``: the fp32 (weight, bias) with the change applied, stored layout
        (the bias passed in, itself, when the method leaves it alone)."""
        raise NotImplementedError

    def unmerged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``reads_base``: the inverse of :meth:`merged`, up to floating-point rounding."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove what :meth:`Method.attached` put outside the layer (hooks); idempotent."""

    def saved_tensors(self) -> dict[str, Tensor] | None:
        """What :func:`~splice.adapters.save_adapter` writes for this adapter instead of its
        parameters (packed codes or bits, keyed by local name), or None to write those."""
        return None

    def load_saved(self, tensors: dict[str, Tensor], where: str) -> None:
        """Fill the adapter from :meth:`saved_tensors`' output read back from ``where``."""
        raise NotImplementedError


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named adapters; ``merge``/``unmerge`` move the active set's ΔW
    in and out of W. ``adapter`` is the first adapter loaded here (``extra`` holds the rest)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter: Adapter,
        record: _Record,
        name: str = DEFAULT,
        bank: _Bank | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.extra = nn.ModuleDict()
        self.primary = name
        self.records = {name: record}
        self.merged = False
        self._merged_set: tuple[tuple[str, float], ...] = ()
        self._stash: tuple[Tensor, Tensor | None] | None = None
        self._bank = bank or _Bank([name], ((name, 1.0),))
        adapter.bind(base_layer)

    @property
    def _record(self) -> _Record:
        return self.records[self.primary]

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    # named adapters ------------------------------------------------------------------------

    def named_adapters(self) -> dict[str, Adapter]:
        """This layer's adapters by name (an adapter that targets other layers is absent)."""
        return {self.primary: self.adapter, **self.extra}

    def get(self, name: str) -> Adapter | None:
        if name == self.primary:
            return self.adapter
        return self.extra._modules.get(name)  # type: ignore[return-value]

    def add(self, name: str, adapter: Adapter, record: _Record) -> None:
        adapter.bind(self.base_layer)
        self.extra[name] = adapter
        self.records[name] = record

    def drop(self, name: str) -> bool:
        """Forget adapter ``name``; True when the layer holds no adapter afterwards."""
        del self.records[name]
        if name != self.primary:
            del self.extra[name]
            return False
        if not self.extra:
            return True
        self.primary = next(iter(self.extra))
        self.adapter = self.extra.pop(self.primary)
        return False

    # forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        # x None: called by keyword only (HF attention modules); prefix adapters ignore x
        active = self._bank.active
        rows = self._bank.rows
        one = self._one_active()
        single = self.get(active[0][0]) if one else None
        alone = rows is None and not self.merged and single is not None
        if alone and (single.wraps_base or single.fuses_base):
            return single.around(self.base_layer, x, *args, **kwargs)
        if rows is not None and x is not None and not self.merged and self._runs_base(rows):
            return self._routed(x, None, rows, args, kwargs)  # no base output on every row
        y = self.base_layer(*args, **kwargs) if x is None else self.base_layer(x, *args, **kwargs)
        if rows is not None:
            return self._routed(x, y, rows, args, kwargs)
        if self.merged:
            return y
        if one:
            return y if single is None else single(x, y)
        return self._mixed(x, y, [(self.get(n), w) for n, w in active], args, kwargs)

    def _run_adapter(
        self, adapter: Adapter, x: Tensor, y: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        """One adapter's output on rows ``x`` whose base output is ``y``."""
        if adapter.wraps_base:
            return adapter.around(self.base_layer, x, *args, **kwargs)
        return adapter(x, y)

    def _mixed(
        self,
        x: Tensor,
        y: Tensor,
        pairs: list[tuple[Adapter | None, Tensor | float]],
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Tensor:
        """y + Σ_k w_k·(adapter_k(x, y) − y): each adapter's change, weighted (any method)."""
        out = y
        for adapter, w in pairs:
            if adapter is not None:
                out = out + w * (self._run_adapter(adapter, x, y.clone(), args, kwargs or {}) - y)
        return out

    def _runs_base(self, rows: Rows) -> bool:
        """Every adapter routed to calls the base layer itself (IA³ on inputs, OFT): the
        full-batch base output would be computed and not used."""
        if rows.weights is not None:
            return False
        adapters = [a for name, _, _ in rows.spans if (a := self.get(name)) is not None]
        return bool(adapters) and all(a.wraps_base for a in adapters)

    def _routed(self, x: Tensor, y: Tensor | None, rows: Rows, args: tuple, kwargs: dict) -> Tensor:
        """``rows``' adapters on their rows; ``y`` None (:meth:`_runs_base`): the base output
        is computed only for the rows that get no adapter."""
        if self.merged:
            raise SpliceError(
                "a mixed batch needs unmerged adapters", fix="unmerge_adapters(model) first"
            )
        n = (y if x is None else x).shape[0]
        if n != rows.n:
            raise SpliceError(
                f"{rows.n} rows routed but the layer sees a batch of {n}",
                where=self.adapter.site.name,
                fix="give one adapter name per row of the batch (dim 0)",
            )
        if rows.weights is not None:
            w = rows.weights.to(y.device, y.dtype).reshape(rows.n, -1, *[1] * (y.dim() - 1))
            pairs = [(self.get(n), w[:, k]) for k, n in enumerate(rows.slots)]
            return self._mixed(x, y, pairs, args, kwargs)
        spans = [(self.get(name), a, b) for name, a, b in rows.spans]
        if all(adapter is None for adapter, _, _ in spans):
            return y
        if len(spans) == 1:
            return self._run_adapter(spans[0][0], x, y, args, kwargs)
        order, inverse = (None, None) if rows.sorted else rows.order(x.device)
        xs = x if order is None or x is None else rows.gather(x, order)
        ys = y if order is None or y is None else y.index_select(0, order)
        parts = [
            (ys[a:b] if ys is not None else self.base_layer(xs[a:b], *args, **kwargs))
            if ad is None
            else self._run_adapter(
                ad, None if xs is None else xs[a:b], None if ys is None else ys[a:b], args, kwargs
            )
            for ad, a, b in spans
        ]
        out = torch.cat(parts)
        return out if inverse is None else out.index_select(0, inverse)

    # merging -------------------------------------------------------------------------------

    def delta(self) -> Delta:
        """ΔW of the active set in the base weight's layout: the adapter's own for one active
        adapter, Σ_k w_k·ΔW_k (dense) for a weighted set; raises for input-dependent methods.
        A method that reads the base weight (DoRA, IA³, OFT) gives merged(W) − W at the
        unmerged W."""
        active = [(a, w) for n, w in self._bank.active if (a := self.get(n)) is not None]
        if len(active) == 1 and active[0][1] == 1.0:
            return self.own_delta(active[0][0])
        if not active:
            return Dense(torch.zeros(self.adapter.site.weight_shape))
        return Dense(sum(w * self.own_delta(a).materialize(torch.float32) for a, w in active))

    def own_delta(self, adapter: Adapter) -> Delta:
        if not adapter.reads_base:
            return adapter.delta()
        w, b = self._unmerged_base(adapter)
        return Dense(adapter.merged(w, b)[0] - w)

    def _one_active(self) -> bool:
        """One adapter acts, at weight 1 (it may be absent from this layer)."""
        active = self._bank.active
        return len(active) == 1 and active[0][1] == 1.0

    def _single_active(self) -> Adapter | None:
        return self.get(self._bank.active[0][0]) if self._one_active() else None

    def bias_delta(self, adapter: Adapter | None = None) -> Delta | None:
        """Δb for a method that changes the bias too (IA³ on outputs), else None: of
        ``adapter``, or of the active set (Σ_k w_k·Δb_k)."""
        if adapter is not None:
            return self._own_bias_delta(adapter)
        parts = [
            (w, d)
            for n, w in self._bank.active
            if (a := self.get(n)) is not None and (d := self._own_bias_delta(a)) is not None
        ]
        if not parts:
            return None
        if len(parts) == 1 and parts[0][0] == 1.0:
            return parts[0][1]
        return Dense(sum(w * d.materialize(torch.float32) for w, d in parts))

    def _own_bias_delta(self, adapter: Adapter) -> Delta | None:
        if not adapter.reads_base:
            return None
        w, b = self._unmerged_base(adapter)
        if b is None:
            return None
        new = adapter.merged(w, b)[1]
        return None if new is None or new is b else Dense(new - b)

    def _unmerged_base(self, adapter: Adapter) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            w, b = adapter.base()
            w, b = w.detach().float(), None if b is None else b.detach().float()
            if not self.merged:
                return w, b
            if self._stash is not None:  # a weighted set that reads the base was merged
                dw, db = self._stash
                return w - dw, None if b is None or db is None else b - db
            return adapter.unmerged(w, b)

    def merge(self) -> None:
        """W ← W + ΔW (and b ← b + Δb) of the active set; idempotent."""
        if not self.merged:
            self._shift(+1)
            self.merged = True
            self._merged_set = self._bank.active

    def unmerge(self) -> None:
        """W ← W − ΔW (of the set that was merged); restores W up to floating-point rounding."""
        if self.merged:
            active, self._bank.active = self._bank.active, self._merged_set
            try:
                self._shift(-1)
            finally:
                self._bank.active = active
            self.merged = False

    def _shift(self, sign: int) -> None:
        w = self.adapter.site.weight(self.base_layer)
        b = getattr(self.base_layer, "bias", None)
        with torch.no_grad():
            single = self._single_active()
            if single is not None and single.reads_base:
                self._shift_base(sign, w, single)
                return
            if sign < 0 and self._stash is not None:
                dw, db = self._stash
                self._stash = None
            else:
                dw = self.delta().materialize(torch.float32).to(w.device)
                bias = self.bias_delta()
                db = None if bias is None else bias.materialize(torch.float32).to(w.device)
                reads = (self.get(n) for n, _ in self._bank.active)
                if any(a is not None and a.reads_base for a in reads):
                    # W + Σ w_k·(W_k − W) cannot be recomputed once merged: keep it to unmerge
                    self._stash = (dw, db)
            w.copy_((w.float() + dw if sign > 0 else w.float() - dw).to(w.dtype))
            if b is not None and db is not None:
                b.copy_((b.float() + db if sign > 0 else b.float() - db).to(b.dtype))

    def _shift_base(self, sign: int, w: Tensor, adapter: Adapter) -> None:
        """Merge (W + ΔW, b + Δb: the exported deltas, bit for bit) or invert the change."""
        b = getattr(self.base_layer, "bias", None)
        if sign > 0:
            new_w, new_b = w.float() + self.delta().materialize(torch.float32), None
            db = self.bias_delta()
            new_b = None if db is None else b.float() + db.materialize(torch.float32)
        else:
            new_w, new_b = adapter.unmerged(w.float(), None if b is None else b.float())
        w.copy_(new_w.to(w.dtype))
        if b is not None and new_b is not None:
            b.copy_(new_b.to(b.dtype))
