"""The method protocol and the registry of methods (:data:`METHODS`).

A method is one file that registers a :class:`Method` here: a config model, a builder of
per-site :class:`~splice.adapters.layer.Adapter` s and a parameter-count formula, plus the
optional hooks (its own sites, PEFT formats, training-loop hooks) the docstrings below name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic
from torch import Tensor, nn

from splice._registry import Registry
from splice._schema import Strict

if TYPE_CHECKING:
    from ._sites import Site
    from .layer import Adapter

__all__ = ["FAMILIES", "METHODS", "Method", "MethodConfig"]

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
    identity_at_init: ClassVar[bool] = True  # False: its output differs from base at step 0
    # False: it changes the backbone's inputs (virtual tokens, a key/value prefix) through one
    # model-wide hook, so it cannot share a model with other named adapters (mixed batches)
    shares_model: ClassVar[bool] = True

    def sharing_refused(self, cfg: Any) -> str | None:
        """Why an adapter of this config cannot share a model with other named adapters
        (one line), or None when it can."""
        if self.shares_model:
            return None
        return (
            f"{self.pretty_name} changes the backbone's inputs through one model-wide hook, so "
            "it cannot share a model with other named adapters"
        )

    def find(
        self, model: nn.Module, targets: Any, layers: Any, cfg: Any
    ) -> list[tuple[str, nn.Module, Any]] | None:
        """The layers to wrap, for a method whose sites are not the matched layers themselves
        (a sublayer's output, an attention module); None: the matched layers."""
        return None

    def attached(self, model: nn.Module, adapters: list[Adapter], cfg: Any) -> None:
        """After the layers are wrapped: hooks outside them (undone by :meth:`Adapter.detach`)."""

    def export(
        self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The saved form of the adapter (e.g. prefix tuning materialises its MLP's output)."""
        return config, tensors

    def peft_files(
        self, model: nn.Module, base: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """A PEFT dir (config, tensors) of the method's own PEFT type; None: export as LoRA."""
        return None

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
    shapes: dict[str, list[int]] = field(default_factory=dict)  # base weight shape per site

    def to_json(self) -> dict[str, Any]:
        # no ``sites`` where they are the keys of ``shapes`` (read_adapter restores them)
        sites = {} if list(self.shapes) == self.sites else {"sites": self.sites}
        return {
            "method": self.method,
            "config": self.config.model_dump(),
            "targets": self.targets,
            "layers": self.layers,
            "modules_to_save": self.modules_to_save,
            **sites,
            "shapes": self.shapes,
        }
