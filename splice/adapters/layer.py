"""The adapted layer, the method protocol and the registry of methods.

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

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from splice._registry import Registry
from splice._schema import Strict
from splice.deltas import Delta, Dense
from splice.errors import SpliceError

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

METHODS: Registry[type[Method]] = Registry("adapter method", "splice.adapters")


# The PEFT taxonomy (spec other.md §9.4) each method declares its place in (``Method.family``),
# with the vision survey's (V-PEFT, Xin et al.) name of the same group.
FAMILIES = {
    "additive": "addition-based: adapter / side tuning",
    "selective": "partial-based: specification tuning",
    "reparameterized": "partial-based: reparameter tuning",
    "hybrid": "unified-based",
}


class MethodConfig(Strict):
    """Hyperparameters of a method; unknown keys are errors (a misspelled ``alpah`` fails)."""

    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")


class Adapter(nn.Module):
    """One site's trainable change ΔW = scale·B@A. Subclasses implement :meth:`factors`."""

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


class Method:
    """A registered PEFT method: a config model, a builder of per-site adapters, a formula.

    Subclasses set ``pretty_name``, ``reference_url``, ``family``, ``Config`` and implement
    :meth:`build` and :meth:`num_parameters` (the spec's trainable-parameter formula).
    """

    pretty_name: ClassVar[str]
    reference_url: ClassVar[str]
    family: ClassVar[str]  # its group in the taxonomy: a key of FAMILIES
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv1d_gpt2", "embedding", "conv"})
    uses_all_parameters: ClassVar[bool] = True  # False if a forward may skip some (DDP needs it)
    mergeable: ClassVar[bool] = True  # False if ΔW depends on the input: delta() raises
    # The selectors (splice/select) that configure it, when it trains nothing on its own.
    selected_by: ClassVar[tuple[str, ...]] = ()
    lowrank: ClassVar[bool] = True  # False if ΔW is not B@A (sparse): no PEFT LoRA export

    def build(self, sites: list[Site], cfg: Any) -> list[Adapter]:
        raise NotImplementedError

    def num_parameters(self, sites: list[Site], cfg: Any) -> int:
        raise NotImplementedError

    def aux_loss(self, adapters: list[Adapter], cfg: Any) -> Tensor | None:
        """An auxiliary loss from the last forward (router balance, task contrast), or None."""
        return None

    def task_slots(self, cfg: Any) -> int:
        """How many task ids the method routes by (:meth:`set_task`); 0: it takes no task."""
        return 0

    def set_task(self, model: nn.Module, task: int) -> None:
        """Route ``model``'s adapters by ``task`` for the following forwards (task methods)."""
        raise NotImplementedError(f"{self.pretty_name} takes no task id")


@dataclass
class _Record:
    """What one ``inject`` call did; shared by its layers and written next to the weights
    (:mod:`splice.adapters.files` adds the format tag)."""

    method: str
    config: MethodConfig
    targets: list[str] | str
    layers: list[int] | None
    modules_to_save: list[str]
    sites: list[str]
    shapes: dict[str, list[int]] = field(default_factory=dict)  # base weight shape per site

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config.model_dump(),
            "targets": self.targets,
            "layers": self.layers,
            "modules_to_save": self.modules_to_save,
            "sites": self.sites,
            "shapes": self.shapes,
        }


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
        self._bank = bank or _Bank([name], ((name, 1.0),))

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

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        rows = self._bank.rows
        if rows is not None:
            return self._routed(x, y, rows)
        if self.merged:
            return y
        active = self._bank.active
        if len(active) == 1 and active[0][1] == 1.0:
            adapter = self.get(active[0][0])
            return y if adapter is None else adapter(x, y)
        return self._mixed(x, y, [(self.get(n), w) for n, w in active])

    @staticmethod
    def _mixed(x: Tensor, y: Tensor, pairs: list[tuple[Adapter | None, Tensor | float]]) -> Tensor:
        """y + Σ_k w_k·(adapter_k(x, y) − y): each adapter's change, weighted (any method)."""
        out = y
        for adapter, w in pairs:
            if adapter is not None:
                out = out + w * (adapter(x, y.clone()) - y)
        return out

    def _routed(self, x: Tensor, y: Tensor, rows: Rows) -> Tensor:
        if self.merged:
            raise SpliceError(
                "a mixed batch needs unmerged adapters", fix="unmerge_adapters(model) first"
            )
        if x.shape[0] != rows.n:
            raise SpliceError(
                f"{rows.n} rows routed but the layer sees a batch of {x.shape[0]}",
                where=self.adapter.site.name,
                fix="give one adapter name per row of the batch (dim 0)",
            )
        if rows.weights is not None:
            w = rows.weights.to(y.device, y.dtype).reshape(rows.n, -1, *[1] * (y.dim() - 1))
            return self._mixed(x, y, [(self.get(n), w[:, k]) for k, n in enumerate(rows.slots)])
        spans = [(self.get(name), a, b) for name, a, b in rows.spans]
        if all(adapter is None for adapter, _, _ in spans):
            return y
        if len(spans) == 1:
            return spans[0][0](x, y)
        order, inverse = (None, None) if rows.sorted else rows.order(x.device)
        xs = x if order is None else rows.gather(x, order)
        ys = y if order is None else y.index_select(0, order)
        parts = [ys[a:b] if ad is None else ad(xs[a:b], ys[a:b]) for ad, a, b in spans]
        out = torch.cat(parts)
        return out if inverse is None else out.index_select(0, inverse)

    # merging -------------------------------------------------------------------------------

    def delta(self) -> Delta:
        """ΔW of the active set in the base weight's layout: the adapter's own for one active
        adapter, Σ_k w_k·ΔW_k (dense) for a weighted set; raises for input-dependent methods."""
        active = [(a, w) for n, w in self._bank.active if (a := self.get(n)) is not None]
        if len(active) == 1 and active[0][1] == 1.0:
            return active[0][0].delta()
        if not active:
            return Dense(torch.zeros(self.adapter.site.weight_shape))
        return Dense(sum(w * a.delta().materialize(torch.float32) for a, w in active))

    def merge(self) -> None:
        """W ← W + ΔW of the active set; idempotent."""
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
        with torch.no_grad():
            d = self.delta().materialize(torch.float32).to(w.device)
            w.copy_((w.float() + d if sign > 0 else w.float() - d).to(w.dtype))
