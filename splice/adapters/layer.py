"""The adapted layer, the method protocol and the registry of methods.

An adapter describes its change as ΔW = s·B@A (spec peft.md §22.1 with the ``add`` composer);
the layer's :class:`~splice.adapters._sites.Site` maps that onto Linear, Conv, Embedding or
GPT-2 ``Conv1D`` geometry. :class:`AdaptedLayer` holds a frozen base layer and one method
:class:`Adapter`. A method is one file that registers a :class:`Method` in :data:`METHODS`;
nothing here changes when a method is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from splice._registry import Registry
from splice._schema import Strict
from splice.deltas import Delta, Dense

from ._sites import Site

__all__ = ["FAMILIES", "METHODS", "AdaptedLayer", "Adapter", "Method", "MethodConfig"]

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
    """One site's trainable change ΔW = scale·B@A. Subclasses implement :meth:`factors`.

    A method whose change is not additive (DoRA rescales, IA³ scales, OFT rotates the base
    weight) sets ``reads_base`` and implements :meth:`merged` and :meth:`unmerged` on the base
    (weight, bias) instead; one that must see the input before the base layer does (IA³ on a
    feed-forward layer, OFT) sets ``wraps_base`` and implements :meth:`around`.
    """

    reads_base: ClassVar[bool] = False
    wraps_base: ClassVar[bool] = False

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
        """Remember the base layer (not as a submodule: its weights stay out of the state)."""
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

    # PEFT's name for the method (its ``peft_type``; DoRA: "DORA"), None where peft lacks it,
    # and the tensor names PEFT gives the adapter's own where they differ (splice → peft).
    peft_type: ClassVar[str | None] = None
    peft_names: ClassVar[dict[str, str]] = {}
    peft_tensors: ClassVar[tuple[str, ...]] = ()  # PEFT's names of the per-module tensors

    def to_peft(self, cfg: Any, sites: list[Site]) -> dict[str, Any]:
        """The method's fields of a PEFT ``adapter_config.json``."""
        raise NotImplementedError

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        """Splice options from a PEFT config; pops every field it implements from ``fields``
        (:mod:`splice.adapters._peft` refuses any left that would change the math).
        ``shared``: the dir's tensors outside any module (VeRA's saved projections)."""
        raise NotImplementedError

    def peft_shape(self, adapter: Adapter, name: str) -> tuple[int, ...] | None:
        """The shape PEFT stores tensor ``name`` of ``adapter`` in (None: as splice does)."""
        return None

    def build(self, sites: list[Site], cfg: Any) -> list[Adapter]:
        raise NotImplementedError

    def num_parameters(self, sites: list[Site], cfg: Any) -> int:
        raise NotImplementedError

    def aux_loss(self, adapters: list[Adapter], cfg: Any) -> Tensor | None:
        """An auxiliary loss from the last forward (router balance, task contrast), or None."""
        return None

    def after_step(self, adapters: list[Adapter], cfg: Any, step: int) -> None:
        """Called by the training loop after optimizer step ``step``, gradients still present
        (AdaLoRA's rank allocation); most methods do nothing."""

    def peft_state(self, state: dict[str, Tensor], config: dict[str, Any]) -> None:
        """Adjust the state read from a PEFT dir in place (AdaLoRA: pruned ranks restored)."""

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

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config.model_dump(),
            "targets": self.targets,
            "layers": self.layers,
            "modules_to_save": self.modules_to_save,
            "sites": self.sites,
        }


class AdaptedLayer(nn.Module):
    """A frozen base layer plus one adapter; ``merge``/``unmerge`` move ΔW in and out of W."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter, record: _Record) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self._record = record
        adapter.bind(base_layer)

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.adapter.wraps_base and not self.merged:
            return self.adapter.around(self.base_layer, x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return y if self.merged else self.adapter(x, y)

    def delta(self) -> Delta:
        """ΔW in the base weight's layout (raises for input-dependent methods such as MoLA)."""
        if not self.adapter.reads_base:
            return self.adapter.delta()
        w, b = self._unmerged_base()
        return Dense(self.adapter.merged(w, b)[0] - w)

    def bias_delta(self) -> Delta | None:
        """Δb for a method that changes the bias too (IA³ on outputs), else None."""
        w, b = self._unmerged_base() if self.adapter.reads_base else (None, None)
        if b is None:
            return None
        new = self.adapter.merged(w, b)[1]
        return None if new is None or new is b else Dense(new - b)

    def _unmerged_base(self) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            w, b = self.adapter.base()
            w, b = w.detach().float(), None if b is None else b.detach().float()
            return self.adapter.unmerged(w, b) if self.merged else (w, b)

    def merge(self) -> None:
        """W ← W + ΔW; idempotent."""
        if not self.merged:
            self._shift(+1)
            self.merged = True

    def unmerge(self) -> None:
        """W ← W − ΔW; restores the base weight up to floating-point rounding."""
        if self.merged:
            self._shift(-1)
            self.merged = False

    def _shift(self, sign: int) -> None:
        w = self.adapter.site.weight(self.base_layer)
        with torch.no_grad():
            if self.adapter.reads_base:
                self._shift_base(sign, w)
                return
            d = self.delta().materialize(torch.float32).to(w.device)
            w.copy_((w.float() + d if sign > 0 else w.float() - d).to(w.dtype))

    def _shift_base(self, sign: int, w: Tensor) -> None:
        """Merge (W + ΔW, b + Δb: the exported deltas, bit for bit) or invert the change."""
        b = getattr(self.base_layer, "bias", None)
        if sign > 0:
            new_w, new_b = w.float() + self.delta().materialize(torch.float32), None
            db = self.bias_delta()
            new_b = None if db is None else b.float() + db.materialize(torch.float32)
        else:
            new_w, new_b = self.adapter.unmerged(w.float(), None if b is None else b.float())
        w.copy_(new_w.to(w.dtype))
        if b is not None and new_b is not None:
            b.copy_(new_b.to(b.dtype))
