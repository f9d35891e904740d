"""Merge in memory for the benchmark: every registered merge method over the tasks' weights.

The benchmark merges only the tensors the fine-tunes changed (for LoRA, the adapted weights),
so each merge is small enough to run on whole state dicts. Methods follow the protocol of
:mod:`splice.merge.base`; the bench decides which settings to evaluate: the method's defaults,
and, for methods whose paper tunes a scaling coefficient λ, a small grid on validation data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from splice.merge.base import MergeContext, MergeMethod, methods

__all__ = ["MergeSpec", "merge_specs", "merge_state", "scale_param", "unsupported"]

# Hyperparameter names that mean "scale of the merged task vector" (λ in the papers).
_SCALE_FIELDS = ("lambda", "lambda_", "lam", "scaling_factor", "scaling_coef", "scale")
_LAYER = re.compile(r"\.(\d+)\.")


def scale_param(method: type[MergeMethod]) -> tuple[str, Any] | None:
    """(keyword, default) of the Params field that scales the merged task vector, if any."""
    for name, f in method.Params.model_fields.items():
        if name in _SCALE_FIELDS or f.alias in _SCALE_FIELDS:
            return f.alias or name, f.default
    return None


@dataclass(frozen=True)
class MergeSpec:
    """One setting to evaluate: a registered method with parameter overrides."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    tune: tuple[float, ...] = ()  # λ values to try on validation data (empty: no tuning)

    @property
    def label(self) -> str:
        if self.tune:
            return f"{self.method} (λ tuned on val)"
        if not self.params:
            return self.method
        args = ", ".join(f"{k.rstrip('_')}={v}" for k, v in self.params.items())
        return f"{self.method} ({args})"


def merge_specs(names: Sequence[str] | None, grid: Sequence[float]) -> list[MergeSpec]:
    """Defaults for every method (or ``names``); plus a λ-tuned setting where one exists."""
    out: list[MergeSpec] = []
    for name in names if names is not None else methods.names():
        out.append(MergeSpec(name))
        if grid and scale_param(methods.get(name)):
            out.append(MergeSpec(name, tune=tuple(grid)))
    return out


def merge_state(
    method_name: str,
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    params: Mapping[str, Any],
    seed: int = 0,
) -> tuple[dict[str, Tensor], float]:
    """Merge ``finetuned`` state dicts (same names as ``base``); returns (merged, seconds)."""
    cls = methods.get(method_name)
    method = cls()
    hp = cls.Params(**params)
    mps = [cls.ModelParams() for _ in finetuned]
    names = list(base)
    layers = {n: int(m.group(1)) if (m := _LAYER.search(n)) else None for n in names}
    num_layers = max((v for v in layers.values() if v is not None), default=-1) + 1 or None
    stats: dict[str, Any] = {}

    def ctx(name: str) -> MergeContext:
        return MergeContext(name, seed, layers[name], num_layers, stats, hp, mps)

    start = time.perf_counter()
    for stat in method.global_stats(hp, mps):
        done = False
        while not done:
            for n in names:
                stat.observe(n, base[n], [f[n] for f in finetuned], ctx(n))
            done = stat.end_pass()
        stats[stat.key] = stat.result()
    merged = {  # methods may overwrite their input buffers: hand them copies
        n: method.merge(base[n], [f[n].clone() for f in finetuned], hp, mps, ctx(n)) for n in names
    }
    return merged, time.perf_counter() - start


def unsupported(method_name: str, num_models: int) -> str | None:
    """Why the method cannot merge ``num_models`` inputs, or None if it can."""
    low, high = getattr(methods.get(method_name), "num_models", (1, None))
    if num_models < low or (high is not None and num_models > high):
        return f"takes {low}–{high or '∞'} models, not {num_models}"
    return None
