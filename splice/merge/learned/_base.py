"""The learned-merge registry and result types (data-driven and continual merging).

A learned method is a function in its own file under ``splice/merge/learned/`` that takes a
base module, per-task deltas and (for most) per-task data, and registers a
:class:`LearnedMethod` with ``learned.register(name)``. Its hyperparameters are a frozen
pydantic model whose fields mirror the function's keyword arguments, so recipes and the
benchmark validate them (unknown keys are errors) before any work starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from splice._registry import Registry
from splice._schema import validate
from splice.merge.base import HyperParams

__all__ = ["ContinualStep", "LearnedMerge", "LearnedMethod", "learned"]


@dataclass
class LearnedMerge:
    """What a learned merge returns.

    ``weights``: merged tensor per delta name (base + merged ΔW), on CPU in the base dtype —
    load them with ``module.load_state_dict(weights, strict=False)`` or pass them to
    ``torch.func.functional_call``. ``coefficients``: the learned coefficients (layout in the
    method's docstring) or None. ``history``: the objective after each step. ``info``: seconds,
    coefficient count and method-specific numbers.
    """

    weights: dict[str, Tensor]
    coefficients: Tensor | None = None
    history: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ContinualStep:
    """The merged model after ``task``, the ``index``-th model of a continual sequence."""

    task: str
    index: int
    weights: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)


Data = Literal["unlabeled", "labeled", "none"]


@dataclass(frozen=True)
class LearnedMethod:
    """A registry entry: the function, its hyperparameter schema and what data it needs.

    ``data``: ``unlabeled`` (inputs only), ``labeled`` (inputs and labels, e.g. aTLAS with
    ``objective="ce"``; see :meth:`needs_labels`) or ``none`` (data-free, e.g. OPCM).
    ``continual``: the function yields :class:`ContinualStep` per task instead of returning
    one :class:`LearnedMerge`. ``short``: overrides for a short schedule (quick benchmark
    runs): fewer steps with a proportionally larger learning rate, so the coefficients can
    travel as far as under the paper's schedule.
    """

    name: str
    pretty_name: str
    reference: str
    fn: Callable[..., Any]
    Params: type[HyperParams]
    data: Data = "unlabeled"
    continual: bool = False
    needs_labels: Callable[[HyperParams], bool] = field(default=lambda p: False)
    short: Mapping[str, Any] = field(default_factory=dict)

    def params(self, overrides: Mapping[str, Any] | None = None) -> HyperParams:
        """Validated hyperparameters: the defaults with ``overrides`` (unknown keys raise)."""
        return validate(
            self.Params,
            dict(overrides or {}),
            prefix=f"{self.name}: ",
            fix=f"valid keys: {sorted(self.Params.model_fields)}",
        )

    def run(
        self,
        module: Any,
        deltas: Mapping[str, Mapping[str, Any]],
        data: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        **context: Any,
    ) -> Any:
        """Call the method with validated ``params``. ``data`` goes to methods that use data;
        each ``context`` argument (heads, forward, rows, seed, device, progress, ...) goes to
        the methods whose function takes it, so one call site serves every method."""
        accepted = inspect.signature(self.fn).parameters
        args = (module, deltas) if self.data == "none" else (module, deltas, data)
        extra = {k: v for k, v in context.items() if k in accepted}
        return self.fn(*args, **self.params(params).model_dump(), **extra)

    def defaults(self) -> dict[str, Any]:
        """The function's keyword defaults for the hyperparameters (tests pin them to Params)."""
        sig = inspect.signature(self.fn)
        return {k: sig.parameters[k].default for k in self.Params.model_fields}


learned: Registry[LearnedMethod] = Registry("learned merge method", "splice.merge.learned")
