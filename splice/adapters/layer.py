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
from splice.deltas import Delta

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

    def bind(self, base_layer: nn.Module) -> None:
        """Called once with the frozen base layer it adapts (methods that read W₀: R-AMT)."""

    def saved_tensors(self) -> dict[str, Tensor] | None:
        """What :func:`~splice.adapters.save_adapter` writes for this adapter instead of its
        parameters (packed codes or bits, keyed by local name), or None to write those."""
        return None

    def load_saved(self, tensors: dict[str, Tensor], where: str) -> None:
        """Fill the adapter from :meth:`saved_tensors`' output read back from ``where``."""
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
    zero_init: ClassVar[bool] = True  # False if the model changes at step 0 (quantised Up)

    def build(self, sites: list[Site], cfg: Any) -> list[Adapter]:
        raise NotImplementedError

    def num_parameters(self, sites: list[Site], cfg: Any) -> int:
        raise NotImplementedError

    def aux_loss(self, adapters: list[Adapter], cfg: Any) -> Tensor | None:
        """An auxiliary loss from the last forward (router balance, task contrast), or None."""
        return None

    def guide(self, adapters: list[Adapter], cfg: Any) -> Any:
        """Gradient surgery driven by a teacher forward and a second backward (R-AMT's GDR):
        an object with ``teacher()`` (a context for the teacher's forward) and
        ``__call__(student_logits, teacher_logits)`` (run before the loop's backward), or None.
        """
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
        y = self.base_layer(x, *args, **kwargs)
        return y if self.merged else self.adapter(x, y)

    def delta(self) -> Delta:
        """ΔW in the base weight's layout (raises for input-dependent methods such as MoLA)."""
        return self.adapter.delta()

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
            d = self.delta().materialize(torch.float32).to(w.device)
            w.copy_((w.float() + d if sign > 0 else w.float() - d).to(w.dtype))
