"""Merge in memory for the benchmark: every registered merge method over the tasks' weights.

The benchmark merges only the tensors the fine-tunes changed (for LoRA, the adapted weights),
so each merge is small enough to run on whole state dicts. Methods and transforms follow the
protocol of :mod:`splice.merge.base`; the bench decides which settings to evaluate: each
method's defaults; for methods whose paper tunes the scale λ of the merged task vector, λ from a
small grid chosen on validation data; and each transform (LiNeS) on top of task arithmetic at
λ=1, its required scalar (β) tuned the same way (spec merging.md §6.3).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from splice.merge.base import MergeMethod, methods, transforms

__all__ = ["MergeSpec", "merge_specs", "merge_state", "scale_param", "symbol", "unsupported"]

# Hyperparameter names that mean "scale of the merged task vector" (λ in the papers).
_SCALE_FIELDS = ("lambda", "lambda_", "lam", "scaling_factor", "scaling_coef", "scale")
TRANSFORM_BASE = "task_arithmetic"  # the base method transforms are evaluated on
# Values for hyperparameters a method leaves required (no default), from the spec's presets.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dare": {"model_params": {"p": 0.5}},  # FusionBench preset, merging.md §3.4
    # mergekit's documented example; at the method's defaults (density 1) the window keeps
    # every entry and the row would be task arithmetic's (the bench before 2026-12-08)
    "breadcrumbs": {"model_params": {"density": 0.9, "gamma": 0.01}},
}


def symbol(key: str) -> str:
    """Greek letters for the usual scalars in labels (``lambda`` → λ)."""
    return {"lambda": "λ", "lambda_": "λ", "beta": "β", "alpha": "α"}.get(key, key)


def scale_param(method: type[MergeMethod]) -> tuple[str, Any] | None:
    """(keyword, default) of the Params field that scales the merged task vector, if any."""
    for name, f in method.Params.model_fields.items():
        if name in _SCALE_FIELDS or f.alias in _SCALE_FIELDS:
            return f.alias or name, f.default
    return None


@dataclass(frozen=True)
class MergeSpec:
    """One setting to evaluate: a method (plus an optional transform) with overrides.

    ``tune`` lists values to try on validation for ``tune_key`` (of the transform's params
    when a transform is set, else of the method's).
    """

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    model_params: Mapping[str, Any] = field(default_factory=dict)  # the same for every input
    transform: str | None = None
    transform_params: Mapping[str, Any] = field(default_factory=dict)
    tune: tuple[float, ...] = ()
    tune_key: str | None = None
    learned: bool = False  # a data-driven method of splice.merge.learned
    repair_bn: bool = False  # batch-norm repair of the merge (splice.bench.bn_repair)

    @property
    def key(self) -> str:
        parts = [self.method, *(f"{k}={v}" for k, v in self.chosen_fixed.items())]
        if self.transform:
            parts.append(f"+{self.transform}")
        if self.repair_bn:
            parts.append("+bn")
        return "@".join(parts) + ("@tuned" if self.tune else "")

    @property
    def label(self) -> str:
        """E.g. ``dare p=0.5 · λ val``: overrides, transform, the parameter tuned on val."""
        args = " ".join(f"{symbol(k)}={v}" for k, v in self.chosen_fixed.items())
        label = f"{self.method} {args}".strip()
        if self.transform:
            label += f" + {self.transform}"
        if self.repair_bn:
            label += " + BN repair"
        return label + (f" · {symbol(self.tune_key or '')} val" if self.tune else "")

    def resolved_key(self) -> str:
        """Identifies the merge itself: every parameter resolved to its value, defaults too."""
        cls = methods.get(self.method)
        parts: dict[str, Any] = {
            "method": self.method,
            "params": cls.Params(**self.params).model_dump(),
            "model_params": cls.ModelParams(**self.model_params).model_dump(),
        }
        if self.transform:
            tp = transforms.get(self.transform).Params(**self.transform_params)
            parts["transform"] = [self.transform, tp.model_dump()]
        if self.repair_bn:
            parts["repair_bn"] = True
        return json.dumps(parts, sort_keys=True, default=str)

    def with_value(self, value: float) -> MergeSpec:
        """This spec with the tuned parameter fixed to ``value``."""
        if self.transform:
            tp = {**self.transform_params, self.tune_key: value}
            return dataclasses.replace(self, transform_params=tp, tune=())
        return dataclasses.replace(self, params={**self.params, self.tune_key: value}, tune=())

    @property
    def chosen_fixed(self) -> dict[str, Any]:
        """The method's parameter overrides (per-input ones included), before tuning."""
        return {**self.model_params, **self.params}

    @property
    def chosen(self) -> dict[str, Any]:
        """Every override, the tuned value included."""
        return {**self.model_params, **self.params, **self.transform_params}


def merge_specs(
    names: Sequence[str] | None, grid: Sequence[float], learned_steps: int | None = None
) -> list[MergeSpec]:
    """Settings for every registered method, transform and learned method (or ``names``).

    A method runs at its defaults, plus λ-tuned where it has a λ; a transform runs on task
    arithmetic at λ=1 with its one required scalar tuned on ``grid``; a learned method runs
    at its defaults with its optimisation steps capped at ``learned_steps``.
    """
    from splice.merge.learned import learned

    if names is None:
        names = [*methods.names(), *_transform_names(), *learned.names()]
    out: list[MergeSpec] = []
    for name in names:
        if name in transforms.names():
            out += _transform_specs(name, grid)
            continue
        if name in learned.names():
            out.append(MergeSpec(name, _capped_steps(name, learned_steps), learned=True))
            continue
        spec = MergeSpec(name, **PRESETS.get(name, {}))
        out.append(spec)
        scale = scale_param(methods.get(name))
        if grid and scale:
            out.append(dataclasses.replace(spec, tune=tuple(grid), tune_key=scale[0]))
    return out


def _capped_steps(name: str, cap: int | None) -> dict[str, int]:
    """Overrides that cap every ``steps``/``*_steps`` hyperparameter of a learned method."""
    from splice.merge.learned import learned

    fields = learned.get(name).Params.model_fields.items()
    return {
        k: cap
        for k, f in fields
        if cap is not None and (k == "steps" or k.endswith("_steps")) and f.default > cap
    }


def _transform_names() -> list[str]:
    """Transforms the in-memory engine applies (each is a keyword of ``merge_state_dicts``)."""
    from splice.merge import merge_state_dicts

    accepted = inspect.signature(merge_state_dicts).parameters
    return [n for n in transforms.names() if n in accepted]


def _transform_specs(name: str, grid: Sequence[float]) -> list[MergeSpec]:
    if name not in _transform_names():
        return []
    fields = transforms.get(name).Params.model_fields
    required = [f.alias or n for n, f in fields.items() if f.is_required()]
    if len(required) > 1 or (required and not grid):
        return []  # nothing sensible to run without values for its parameters
    lam = scale_param(methods.get(TRANSFORM_BASE))
    spec = MergeSpec(TRANSFORM_BASE, {lam[0]: 1.0} if lam else {}, transform=name)
    if required:
        spec = dataclasses.replace(spec, tune=tuple(grid), tune_key=required[0])
    return [spec]


def merge_state(
    spec: MergeSpec,
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    seed: int = 0,
) -> tuple[dict[str, Tensor], float]:
    """Merge ``finetuned`` state dicts (same names as ``base``) with the streaming engine;
    returns (merged, seconds)."""
    from splice.merge import merge_state_dicts

    transform = {spec.transform: dict(spec.transform_params)} if spec.transform else {}
    start = time.perf_counter()
    merged = merge_state_dicts(
        spec.method,
        list(finetuned),
        base=base,
        params=dict(spec.params),
        model_params=[dict(spec.model_params) for _ in finetuned],
        seed=seed,
        **transform,
    )
    return merged, time.perf_counter() - start


def unsupported(spec: MergeSpec, num_models: int) -> str | None:
    """Why the method cannot merge ``num_models`` inputs, or None if it can."""
    if spec.learned:
        return None
    cls = methods.get(spec.method)
    given = {**spec.params, **spec.model_params}
    missing = [
        f.alias or n
        for schema in (cls.Params, cls.ModelParams)
        for n, f in schema.model_fields.items()
        if f.is_required() and (f.alias or n) not in given and n not in given
    ]
    if missing:
        return f"needs values for {', '.join(missing)} (no defaults)"
    low, high = getattr(cls, "num_models", (1, None))
    if num_models < low or (high is not None and num_models > high):
        if high == low:
            count = f"exactly {low} model{'s' if low > 1 else ''} besides the base"
        else:
            count = f"{low}–{high or '∞'} models besides the base"
        return f"merges {count}, not {num_models}"
    return None
