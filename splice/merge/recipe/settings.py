"""Recipe values, normalized: parameter settings, their per-tensor resolution, dtypes, and the
:class:`Recipe` either dialect (:mod:`.splice`, :mod:`.mergekit`) is read into.

A value may vary with depth, ``{gradient: [0, 0.5, 1]}`` (interpolated over the layer stack),
or with the tensor name, ``[{filter: self_attn, value: 0.3}, {value: 0.7}]`` (first substring
match wins), or with the block type found from the name by :mod:`splice.merge.engine.arch`,
``[{block: attn, value: 0.3}, {value: 0.7}]`` (embed, attn, mlp, norm, head, other — the
same recipe for Llama's ``self_attn``, GPT-2's ``attn`` and T5's ``SelfAttention``).
mergekit's syntax differs: a bare list is a gradient, and rules have no ``block``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from splice._schema import did_you_mean, schema_error, validate
from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeMethod, methods, transforms
from splice.merge.engine.arch import BLOCKS, block_of

__all__ = [
    "Gradient",
    "ModelSpec",
    "ParamResolver",
    "Recipe",
    "Rule",
    "Setting",
    "SliceSource",
    "SliceSpec",
    "evaluate",
    "method_table",
    "parse_dtype",
    "parse_setting",
    "recipe_error",
]

Scalar = bool | int | float | str | None

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}
"""The compute/output dtypes a recipe may name (and their short forms) → the dtype name."""


def parse_dtype(name: str | None, where: str = "dtype") -> str | None:
    """A recipe's or option's dtype as its name (``"bf16"`` → ``"bfloat16"``); None: none."""
    if name is None:
        return None
    if name not in DTYPES:
        raise SpliceError(
            f"unknown dtype {name!r}", where=where, fix=f"use one of {sorted(set(DTYPES))}"
        )
    return DTYPES[name]


@dataclass(frozen=True)
class Gradient:
    """Anchor values spread evenly over the layer stack, linearly interpolated (mergekit)."""

    values: tuple[Scalar, ...]

    def at(self, depth: float) -> Scalar:
        vals = self.values
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            return vals[int(depth * (len(vals) - 1))]
        scaled = depth * (len(vals) - 1)
        i0 = int(scaled)
        i1 = min(len(vals) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * vals[i0] + frac * vals[i1]  # type: ignore[operator]


@dataclass(frozen=True)
class Rule:
    """``value`` for tensors whose name contains ``filter`` (None or "*" matches all) and,
    if ``block`` is given, whose block type (:func:`splice.merge.engine.arch.block_of`) is it."""

    filter: str | None
    value: Scalar | Gradient
    block: str | None = None

    def matches(self, name: str | None) -> bool:
        if self.block is not None and (name is None or block_of(name) != self.block):
            return False
        return self.filter in (None, "*") or bool(name and self.filter in name)


Setting = Scalar | Gradient | tuple[Rule, ...]
_NO_MATCH = object()


def evaluate(setting: Setting, name: str | None, depth: float) -> Any:
    """Resolve a setting for one tensor; ``name`` None is the model level (no filters match)."""
    if isinstance(setting, Gradient):
        return setting.at(depth)
    if isinstance(setting, tuple):
        for rule in setting:
            if rule.matches(name):
                return evaluate(rule.value, name, depth)
        return _NO_MATCH
    return setting


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def parse_setting(raw: Any, where: str, *, mergekit: bool) -> Setting:
    """Parse one parameter value (splice or mergekit syntax, see module docstring)."""
    if _is_scalar(raw):
        return raw
    if isinstance(raw, Mapping) and set(raw) == {"gradient"} and not mergekit:
        grad = raw["gradient"]
        if not (isinstance(grad, list) and grad and all(_is_scalar(v) for v in grad)):
            raise SpliceError("gradient must be a non-empty list of numbers", where=where)
        return Gradient(tuple(grad))
    if isinstance(raw, list) and raw and all(_is_scalar(v) for v in raw):
        if not mergekit:
            raise SpliceError(
                "a bare list is ambiguous in a splice recipe",
                where=where,
                fix=f"write {{gradient: {raw}}} for a value that varies with depth",
            )
        return Gradient(tuple(raw))
    rules = [raw] if isinstance(raw, Mapping) else raw
    if isinstance(rules, list) and rules and all(isinstance(r, Mapping) for r in rules):
        out = []
        keys = {"filter", "value"} if mergekit else {"filter", "block", "value"}
        for r in rules:
            unknown = set(r) - keys
            if unknown or "value" not in r:
                raise SpliceError(
                    f"a filter rule has keys {sorted(r)}",
                    where=where,
                    fix="write {filter: <substring>, value: <value>} (filter optional)"
                    + ("" if mergekit else "; or {block: attn, value: <value>}"),
                )
            value = parse_setting(r["value"], where, mergekit=mergekit)
            if isinstance(value, tuple):
                raise SpliceError("filter rules cannot nest", where=where)
            filt, block = r.get("filter"), r.get("block")
            if block is not None and block not in BLOCKS:
                raise _unknown(str(block), list(BLOCKS), "block type", where)
            out.append(Rule(None if filt is None else str(filt), value, block))
        return tuple(out)
    raise SpliceError(f"cannot read parameter value {raw!r}", where=where)


def _has_gradient(setting: Setting) -> bool:
    if isinstance(setting, tuple):
        return any(_has_gradient(r.value) for r in setting)
    return isinstance(setting, Gradient)


def _fields(model: type[HyperParams]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _unknown(key: str, known: list[str], what: str, where: str) -> SpliceError:
    return SpliceError(f"unknown {what} {key!r}", where=where, fix=did_you_mean(key, known))


class ParamResolver:
    """Per-tensor parameters: per-model setting > global setting > the schema's default.

    ``outer`` are lower-precedence global layers, highest first (mergekit's order: slice
    source > slice > module > global ``parameters``; a filter list that matches nothing
    falls through to the next layer)."""

    def __init__(
        self,
        method: type[MergeMethod],
        settings: Mapping[str, Setting],
        model_settings: list[Mapping[str, Setting]],
        model_labels: list[str],
        outer: Sequence[Mapping[str, Setting]] = (),
    ) -> None:
        self.method = method
        self.global_fields = _fields(method.Params)
        self.model_fields = _fields(method.ModelParams)
        for layer in (settings, *outer):
            for key in layer:
                if key not in self.global_fields and key not in self.model_fields:
                    known = self.global_fields + self.model_fields
                    raise _unknown(key, known, f"parameter of {method.name}", "params")
        for label, ms in zip(model_labels, model_settings, strict=True):
            for key in ms:
                if key not in self.model_fields:
                    what = f"per-model parameter of {method.name}"
                    if key in self.global_fields:
                        raise SpliceError(
                            f"{key!r} is a global parameter of {method.name}",
                            where=label,
                            fix="move it to the recipe's top-level params",
                        )
                    raise _unknown(key, self.model_fields, what, label)
        self.layers = [dict(settings), *(dict(o) for o in outer)]
        self.settings = self.layers[0]
        self.model_settings = [dict(m) for m in model_settings]
        self.labels = model_labels
        self._cache: dict[tuple[Any, ...], HyperParams] = {}
        every = [v for layer in self.layers for v in layer.values()]
        every += [v for m in self.model_settings for v in m.values()]
        self.uses_depth = any(_has_gradient(v) for v in every)
        """Some value varies with depth, so the model's layer stack must be found."""

    def _build(self, cls: type[HyperParams], values: dict[str, Any], where: str) -> HyperParams:
        key = (cls, *sorted(values.items()))
        if key not in self._cache:
            self._cache[key] = validate(
                cls,
                values,
                prefix="invalid parameter ",
                where=where,
                fix="see `splice merge --list` for the parameters and their ranges",
            )
        return self._cache[key]

    def __call__(self, name: str | None, depth: float) -> tuple[HyperParams, list[HyperParams]]:
        where = name or "model level"
        values = {}
        for key in self.global_fields:
            for source in self.layers:
                if key in source:
                    v = evaluate(source[key], name, depth)
                    if v is not _NO_MATCH:
                        values[key] = v
                        break
        params = self._build(self.method.Params, values, where)
        per_model = []
        for label, ms in zip(self.labels, self.model_settings, strict=True):
            mv = {}
            for key in self.model_fields:
                for source in (ms, *self.layers):
                    if key in source:
                        v = evaluate(source[key], name, depth)
                        if v is not _NO_MATCH:
                            mv[key] = v
                            break
            per_model.append(self._build(self.method.ModelParams, mv, f"{label}: {where}"))
        return params, per_model


@dataclass
class ModelSpec:
    """One input of a :class:`Recipe`: a path, an adapter on it (mergekit ``a+b``), settings."""

    path: str
    adapter: str | None = None
    settings: dict[str, Setting] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One source of an output slice: a model and the layers ``[start, stop)`` taken from it."""

    model: ModelSpec
    layer_range: tuple[int, int]
    where: str = ""
    range_where: str = ""


@dataclass
class SliceSpec:
    """One output slice: its sources (equal layer counts), base and slice-level settings."""

    sources: list[SliceSource]
    base: SliceSource | None
    settings: dict[str, Setting] = field(default_factory=dict)
    where: str = ""

    @property
    def num_layers(self) -> int:
        start, stop = self.sources[0].layer_range
        return stop - start


@dataclass
class Recipe:
    """A recipe in either dialect, normalized: what :func:`splice.merge.api.merge` runs."""

    method: str
    base: str | None
    models: list[ModelSpec]
    settings: dict[str, Setting]
    seed: int = 0
    dtype: str | None = None
    """Compute dtype by name (``"bfloat16"``); None: the engine's default."""
    out_dtype: str | None = None
    """Output dtype by name; None: each tensor's own."""
    lines: dict[str, Any] | None = None
    vocab: Literal["base", "union", "intersect"] | None = None
    output: Literal["model", "adapter"] = "model"
    rank: int | Literal["exact"] | None = None
    dialect: Literal["splice", "mergekit"] = "splice"
    source: dict[str, Any] = field(default_factory=dict)
    slices: list[SliceSpec] | None = None
    """mergekit ``slices:`` that stack or cut layers (:mod:`splice.merge.engine.slices`)."""
    outer: list[dict[str, Setting]] = field(default_factory=list)
    """Lower-precedence global settings under ``settings``, highest first (module, global)."""
    where: Any = None
    """A :class:`~splice.merge.recipe.where.Where` (``file:line`` of a key path) or None."""
    tokenizer: Any = None
    """A :class:`~splice.merge.recipe.tokenizer.TokenizerSpec` (mergekit tokenizer surgery)."""

    def flat_settings(self) -> dict[str, Setting]:
        """The global settings with every precedence level applied (highest wins per key)."""
        out: dict[str, Setting] = {}
        for layer in reversed([self.settings, *self.outer]):
            out.update(layer)
        return out

    def input_paths(self) -> list[str]:
        """Every model, adapter and slice source path the recipe reads."""
        specs = [*self.models]
        for sl in self.slices or []:
            specs += [s.model for s in (*sl.sources, *([sl.base] if sl.base else []))]
        paths = [self.base] if self.base else []
        paths += [m.path for m in specs] + [m.adapter for m in specs if m.adapter]
        return list(dict.fromkeys(paths))


def recipe_error(
    e: ValidationError, what: str, top: type[BaseModel], *nested: type[BaseModel]
) -> SpliceError:
    """A recipe schema error in ``what`` (a file or "recipe"): an unknown key names the closest
    key of its section (``top``'s fields at the top level, ``nested``'s below)."""
    scope = [top] if len(e.errors()[0]["loc"]) == 1 else nested
    known = {f for cls in scope for f in cls.model_fields}
    return schema_error(e, prefix=f"{what}: ", known=known)


def method_table() -> list[dict[str, Any]]:
    """Every registered method, transform and learned (data-driven or continual) method with its
    parameters, for ``--list`` and docs. Learned rows carry ``data``: what a recipe's ``data:``
    section must give them (``unlabeled``, ``labeled`` or ``none``)."""

    def params(model: type[HyperParams], scope: str) -> list[dict[str, Any]]:
        out = []
        for name, f in model.model_fields.items():
            out.append(
                {
                    "name": f.alias or name,
                    "scope": scope,
                    "type": getattr(f.annotation, "__name__", None) or str(f.annotation),
                    "default": None if f.is_required() else f.default,
                    "required": f.is_required(),
                    "description": f.description or "",
                }
            )
        return out

    rows = []
    for name, cls in methods.items():
        rows.append(
            {
                "name": name,
                "kind": "method",
                "pretty_name": cls.pretty_name,
                "reference": cls.reference,
                "requires_base": cls.requires_base,
                "params": params(cls.Params, "global") + params(cls.ModelParams, "per-model"),
            }
        )
    for name, tcls in transforms.items():
        rows.append(
            {
                "name": name,
                "kind": "transform",
                "pretty_name": tcls.pretty_name,
                "reference": tcls.reference,
                "requires_base": tcls.requires_base,
                "params": params(tcls.Params, "global"),
            }
        )
    from splice.merge.learned import learned

    for name, lm in learned.items():
        rows.append(
            {
                "name": name,
                "kind": "continual" if lm.continual else "learned",
                "pretty_name": lm.pretty_name,
                "reference": lm.reference,
                "requires_base": True,
                "data": lm.data,
                "params": params(lm.Params, "global"),
            }
        )
    return rows
