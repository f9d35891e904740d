"""``--budget N``: size every adapter method to about N trainable parameters, generically.

A method's size knobs are found from its ``Config``, not listed per method: the integer
options with a lower bound ≥ 1 (``r``, ``k``, ``l``, ``e``, …; ``seed`` and ``p`` have none),
kept when changing them changes the method's own parameter formula (``num_parameters``) on the
model's sites. Options that share a value are also tried as one knob moved together (NOLA's
k = l), before the single ones. Each knob is searched (doubling, then bisection) for the
values whose count brackets N; the candidate nearest N whose adapters build wins (ties: the
earlier knob). The step of the winning knob at its value is the method's *granularity*: the
count moves by that much per unit, so the count lies within one step of N unless the knob
reaches its smallest value above N (the structure's floor, reported as such).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import annotated_types

__all__ = ["Sizing", "fit_budget", "size_knobs"]

_CEILING = 1 << 20  # no knob is searched past this value


@dataclass(frozen=True)
class Sizing:
    """The options that bring a method nearest the budget, and what they give."""

    options: dict[str, Any]
    count: int
    step: int  # the count's change per unit of the knob at its value
    knob: tuple[str, ...]
    floor: bool  # the knob is at its smallest value and the count still exceeds the budget


def _min(field: Any) -> int | None:
    low = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            low = int(m.gt) + 1
        elif isinstance(m, annotated_types.Ge):
            low = int(m.ge)
    return low if low is not None and low >= 1 else None


def size_knobs(method: Any, sites: Sequence[Any], base: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The method's size knobs on these sites: tied groups first, then single options."""
    fields = method.Config.model_fields
    ints = [n for n, f in fields.items() if f.annotation is int and _min(f) is not None]
    cfg = method.Config(**base)
    count = _counter(method, sites, dict(base))
    single = []
    for name in ints:
        value = getattr(cfg, name)
        if count({name: value + 1}) != count({name: value}):
            single.append((name,))
    values: dict[int, list[str]] = {}
    for (name,) in single:
        values.setdefault(getattr(cfg, name), []).append(name)
    tied = [tuple(names) for names in values.values() if len(names) > 1]
    return tied + single


def _counter(method: Any, sites: Sequence[Any], base: dict[str, Any]):
    def count(update: Mapping[str, Any]) -> int | None:
        try:
            cfg = method.Config(**{**base, **update})
        except ValueError:
            return None
        return int(method().num_parameters(list(sites), cfg))

    return count


def _bracket(count, knob: tuple[str, ...], low: int, budget: int) -> list[int]:
    """Knob values whose counts bracket ``budget`` (counts grow with the knob)."""

    def at(v: int) -> int | None:
        return count(dict.fromkeys(knob, v))

    first = at(low)
    if first is None or first >= budget:
        return [low]
    hi = low
    while hi < _CEILING and (c := at(hi)) is not None and c < budget:
        hi *= 2
    hi = min(hi, _CEILING)
    lo = max(low, hi // 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = at(mid)
        if c is not None and c < budget:
            lo = mid
        else:
            hi = mid
    return [lo, hi]


def _builds(method: Any, sites: Sequence[Any], options: Mapping[str, Any]) -> bool:
    try:
        method().build(list(sites), method.Config(**options))
    except Exception:  # a structure the method rejects (e.g. MoS's shard divisibility)
        return False
    return True


def _nearest_built(
    method: Any, sites: Sequence[Any], base: dict, knob: tuple[str, ...], v: int, way: int, low: int
) -> int | None:
    """The first value from ``v`` in direction ``way`` whose adapters build (32 tries)."""
    for _ in range(32):
        if v < low:
            return None
        if _builds(method, sites, {**base, **dict.fromkeys(knob, v)}):
            return v
        v += way
    return None


def fit_budget(
    method: Any, sites: Sequence[Any], base: Mapping[str, Any], budget: int
) -> Sizing | None:
    """The sizing nearest ``budget``; None when the method has no size knob that builds."""
    base = dict(base)
    count = _counter(method, sites, base)
    fields = method.Config.model_fields
    found = []
    for order, knob in enumerate(size_knobs(method, sites, base)):
        low = max(_min(fields[name]) or 1 for name in knob)
        bracket = _bracket(count, knob, low, budget)
        below = _nearest_built(method, sites, base, knob, bracket[0], -1, low)
        above = _nearest_built(method, sites, base, knob, bracket[-1], +1, low)
        for v in {x for x in (below, above) if x is not None}:
            c = count(dict.fromkeys(knob, v))
            if c is not None:
                found.append((abs(c - budget), order, v, knob, c, low))
    if not found:
        return None
    _, _, v, knob, c, low = min(found, key=lambda f: f[:3])
    up, down = count(dict.fromkeys(knob, v + 1)), count(dict.fromkeys(knob, v - 1))
    step = max(abs(x - c) for x in (up, down) if x is not None) if (up or down) else 0
    floor = c > budget and _nearest_built(method, sites, base, knob, v - 1, -1, low) is None
    return Sizing({**base, **dict.fromkeys(knob, v)}, c, step, knob, floor)
