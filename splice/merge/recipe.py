"""Merge recipes: splice's YAML, and mergekit's YAML for the methods both have, unchanged.

A splice recipe::

    method: ties
    base: ./base
    models:
      - ./ft_a                                  # a checkpoint, PEFT adapter dir or delta file
      - {path: ./ft_b, params: {weight: 0.5}}
    params: {density: 0.2, lambda: 1.0}         # method params + defaults for per-model ones
    seed: 0
    dtype: float32                              # compute dtype; out_dtype: storage dtype
    lines: {beta: 0.5}                          # optional post-merge transform
    vocab: union                                # when embedding rows differ: base|union|intersect
    output: adapter                             # LoRA dirs in, one LoRA dir out (rank: 16|exact)

A value may vary with depth, ``{gradient: [0, 0.5, 1]}`` (interpolated over the layer stack),
or with the tensor name, ``[{filter: self_attn, value: 0.3}, {value: 0.7}]`` (first substring
match wins), or with the block type found from the name by :mod:`splice.merge.arch`,
``[{block: attn, value: 0.3}, {value: 0.7}]`` (embed, attn, mlp, norm, head, other — the
same recipe for Llama's ``self_attn``, GPT-2's ``attn`` and T5's ``SelfAttention``).
A mergekit recipe (``merge_method:``) keeps mergekit's syntax (a bare list is a gradient) and
semantics (TIES/DARE per tensor, mergekit's defaults). Unknown keys, methods and
parameters are errors, with a suggestion. Paths are local; a relative path is resolved from
the working directory and is never a hub id.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splice.errors import SpliceError
from splice.merge.arch import BLOCKS, block_of
from splice.merge.base import HyperParams, MergeMethod, methods, transforms

__all__ = [
    "Gradient",
    "ParamResolver",
    "Recipe",
    "Rule",
    "load_recipe",
    "method_table",
    "parse_dtype",
]

Scalar = bool | int | float | str | None

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
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
    if ``block`` is given, whose block type (:func:`splice.merge.arch.block_of`) is it."""

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
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known) or 'none'}"
    return SpliceError(f"unknown {what} {key!r}", where=where, fix=hint)


def _validation_error(e: ValidationError, where: str) -> SpliceError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return SpliceError(
        f"invalid parameter {loc}: {err['msg']}" if loc else err["msg"],
        where=where,
        fix="see `splice merge --list` for the parameters and their ranges",
    )


class ParamResolver:
    """Per-tensor parameters: per-model setting > global setting > the schema's default."""

    def __init__(
        self,
        method: type[MergeMethod],
        settings: Mapping[str, Setting],
        model_settings: list[Mapping[str, Setting]],
        model_labels: list[str],
    ) -> None:
        self.method = method
        self.global_fields = _fields(method.Params)
        self.model_fields = _fields(method.ModelParams)
        for key in settings:
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
        self.settings = dict(settings)
        self.model_settings = [dict(m) for m in model_settings]
        self.labels = model_labels
        self._cache: dict[tuple[Any, ...], HyperParams] = {}
        every = [*self.settings.values(), *(v for m in self.model_settings for v in m.values())]
        self.uses_depth = any(_has_gradient(v) for v in every)
        """Some value varies with depth, so the model's layer stack must be found."""

    def _build(self, cls: type[HyperParams], values: dict[str, Any], where: str) -> HyperParams:
        key = (cls, *sorted(values.items()))
        if key not in self._cache:
            try:
                self._cache[key] = cls.model_validate(values)
            except ValidationError as e:
                raise _validation_error(e, where) from None
        return self._cache[key]

    def __call__(self, name: str | None, depth: float) -> tuple[HyperParams, list[HyperParams]]:
        where = name or "model level"
        values = {}
        for key in self.global_fields:
            if key in self.settings:
                v = evaluate(self.settings[key], name, depth)
                if v is not _NO_MATCH:
                    values[key] = v
        params = self._build(self.method.Params, values, where)
        per_model = []
        for label, ms in zip(self.labels, self.model_settings, strict=True):
            mv = {}
            for key in self.model_fields:
                for source in (ms, self.settings):
                    if key in source:
                        v = evaluate(source[key], name, depth)
                        if v is not _NO_MATCH:
                            mv[key] = v
                            break
            per_model.append(self._build(self.method.ModelParams, mv, f"{label}: {where}"))
        return params, per_model


# ---------------------------------------------------------------------------- recipe schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    path: str = Field(description="checkpoint dir/file, PEFT adapter dir or splice delta file")
    params: dict[str, Any] = Field(default_factory=dict, description="per-model parameters")


class SpliceRecipe(_Strict):
    method: str = Field(description="merge method (see `splice merge --list`)")
    base: str | None = Field(None, description="the pretrained checkpoint (task vectors' origin)")
    models: list[str | ModelEntry] = Field(min_length=1, description="the models to merge")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    seed: int = Field(0, description="seed of stochastic methods (per-tensor RNG)")
    dtype: str | None = Field(None, description="compute dtype (default float32)")
    out_dtype: str | None = Field(None, description="output dtype (default: the base's)")
    lines: dict[str, Any] | None = Field(None, description="LiNeS depth scaling after the merge")
    vocab: Literal["base", "union", "intersect"] | None = Field(
        None, description="embedding/head rows that differ between inputs: whose rows to keep"
    )
    output: Literal["model", "adapter"] = Field(
        "model", description="a merged model dir, or (LoRA inputs only) one LoRA adapter dir"
    )
    rank: Annotated[int, Field(ge=1)] | Literal["exact"] | None = Field(
        None,
        description="output: adapter — LoRA rank of the truncated SVD, or 'exact' (linear methods)",
    )


class _MkModel(_Strict):
    model: str
    parameters: dict[str, Any] | None = None


class _MkSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class _MkSlice(_Strict):
    sources: list[_MkSource]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    residual_weight: float | None = None


class MergekitRecipe(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[_MkModel] | None = None
    slices: list[_MkSlice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None


def _map_leaves(setting: Setting, fn: Any) -> Setting:
    if isinstance(setting, Gradient):
        return Gradient(tuple(fn(v) for v in setting.values))
    if isinstance(setting, tuple):
        return tuple(Rule(r.filter, _map_leaves(r.value, fn)) for r in setting)  # type: ignore[misc]
    return fn(setting)


def _no_rescale(v: Any) -> Any:
    if v:
        raise SpliceError(
            "mergekit ties with rescale: true is not supported",
            fix="drop rescale (TIES keeps the trimmed values as they are)",
        )
    return v


_NORMALIZE = ("aggregate", lambda v: "mean" if v else "sum")


@dataclass(frozen=True)
class _Alias:
    """A mergekit method as a splice method: defaults (mergekit's), parameter renames."""

    method: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    renames: Mapping[str, tuple[str | None, Any]] = field(default_factory=dict)
    base_is_input: bool = False


_DARE_RENAMES = {
    "normalize": _NORMALIZE,
    "density": ("p", lambda v: 1 - v),
    "rescale": ("rescale", lambda v: "l1" if v else "off"),
}
_MERGEKIT = {
    "linear": _Alias("linear", base_is_input=True),
    "slerp": _Alias("slerp"),
    "task_arithmetic": _Alias("task_arithmetic"),
    "ties": _Alias(
        "ties",
        {"scope": "tensor", "zero_sign": "positive", "aggregate": "mean", "density": 1.0},
        {"normalize": _NORMALIZE, "rescale": (None, _no_rescale)},
    ),
    "dare_ties": _Alias(
        "dare",
        {"consensus": "ties", "zero_sign": "positive", "rescale": "l1", "aggregate": "sum", "p": 0},
        _DARE_RENAMES,
    ),
    "dare_linear": _Alias(
        "dare", {"consensus": None, "rescale": "l1", "aggregate": "sum", "p": 0}, _DARE_RENAMES
    ),
}


def _mergekit_settings(
    alias: _Alias, raw: Mapping[str, Any] | None, where: str
) -> dict[str, Setting]:
    """mergekit parameter names and values → the splice method's."""
    out: dict[str, Setting] = {}
    for key, value in (raw or {}).items():
        s = parse_setting(value, f"{where}.{key}", mergekit=True)
        if key == "int8_mask":
            continue  # how mergekit stores its masks; results are identical
        new_key, fn = alias.renames.get(key, (key, None))
        s = _map_leaves(s, fn) if fn is not None else s
        if new_key is not None:
            out[new_key] = s
    return out


@dataclass
class ModelSpec:
    path: str
    adapter: str | None = None
    settings: dict[str, Setting] = field(default_factory=dict)


@dataclass
class Recipe:
    """A recipe in either dialect, normalized: what :func:`splice.merge.merge` runs."""

    method: str
    base: str | None
    models: list[ModelSpec]
    settings: dict[str, Setting]
    seed: int = 0
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    lines: dict[str, Any] | None = None
    vocab: Literal["base", "union", "intersect"] | None = None
    output: Literal["model", "adapter"] = "model"
    rank: int | Literal["exact"] | None = None
    dialect: Literal["splice", "mergekit"] = "splice"
    source: dict[str, Any] = field(default_factory=dict)
    full_range_slices: list[int] = field(default_factory=list)


def _schema_error(
    e: ValidationError, what: str, top: type[BaseModel], *nested: type
) -> SpliceError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        scope = [top] if len(err["loc"]) == 1 else nested
        known = sorted({f for cls in scope for f in cls.model_fields})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return SpliceError(f"unknown key {key!r}", where=f"{what}: {loc}", fix=hint)
    return SpliceError(f"{err['msg']}", where=f"{what}: {loc or 'recipe'}")


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """Read a recipe file or dict (either dialect) and check its schema.

    Raises:
        SpliceError: unreadable YAML, unknown keys, unsupported mergekit features.
    """
    what = "recipe"
    if isinstance(source, str | Path):
        path = Path(source)
        what = str(path)
        if not path.is_file():
            raise SpliceError("recipe file not found", where=str(path))
        from splice._yaml import load_yaml

        raw = load_yaml(path)
    else:
        raw = dict(source)
    if not isinstance(raw, dict):
        raise SpliceError("a recipe must be a mapping of keys to values", where=what)
    if "merge_method" in raw:
        return _from_mergekit(raw, what)
    try:
        r = SpliceRecipe.model_validate(raw)
    except ValidationError as e:
        raise _schema_error(e, what, SpliceRecipe, ModelEntry) from None
    models = []
    for i, m in enumerate(r.models):
        entry = ModelEntry(path=m) if isinstance(m, str) else m
        where = f"models[{i}]"
        settings = {
            k: parse_setting(v, f"{where}.params.{k}", mergekit=False)
            for k, v in entry.params.items()
        }
        models.append(ModelSpec(entry.path, None, settings))
    return Recipe(
        method=r.method,
        base=r.base,
        models=models,
        settings={k: parse_setting(v, f"params.{k}", mergekit=False) for k, v in r.params.items()},
        seed=r.seed,
        dtype=parse_dtype(r.dtype),
        out_dtype=parse_dtype(r.out_dtype, "out_dtype"),
        lines=r.lines,
        vocab=r.vocab,
        output=r.output,
        rank=r.rank,
        dialect="splice",
        source=raw,
    )


def _model_ref(ref: str) -> tuple[str, str | None]:
    """mergekit ``path`` or ``path+lora_path``; ``@revision`` is a hub feature."""
    if "+" in ref and not os.path.exists(ref):
        path, adapter = ref.split("+", 1)
        return path, adapter
    return ref, None


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _from_mergekit(raw: dict[str, Any], what: str) -> Recipe:
    try:
        mk = MergekitRecipe.model_validate(raw)
    except ValidationError as e:
        raise _schema_error(e, what, MergekitRecipe, _MkModel, _MkSlice, _MkSource) from None
    unsupported = {
        "modules": "modular (multi-module) configs",
        "tokenizer": "tokenizer surgery",
        "chat_template": "chat templates",
    }
    for key, feature in unsupported.items():
        if getattr(mk, key) is not None:
            raise SpliceError(
                f"mergekit {feature} ({key}:) are not supported yet",
                where=what,
                fix=f"remove `{key}:`; the base's tokenizer files are copied",
            )
    if mk.tokenizer_source not in (None, "base"):
        raise SpliceError(
            f"tokenizer_source: {mk.tokenizer_source} is not supported yet",
            where=what,
            fix="use tokenizer_source: base, or a splice recipe with `vocab: union` "
            "(embedding rows matched by index; see docs/merging.md)",
        )
    alias = _MERGEKIT.get(mk.merge_method)
    if alias is None:
        supported = sorted(_MERGEKIT)
        close = difflib.get_close_matches(mk.merge_method, supported, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"supported: {', '.join(supported)}"
        raise SpliceError(f"mergekit method {mk.merge_method!r} is not in splice", fix=hint)
    if (mk.models is None) == (mk.slices is None):
        raise SpliceError("exactly one of models: and slices: is needed", where=what)
    base = mk.base_model
    globals_ = {**alias.defaults, **_mergekit_settings(alias, mk.parameters, "parameters")}
    entries: list[tuple[str, dict[str, Any] | None]] = []
    ranges: list[int] = []
    if mk.slices is not None:
        if len(mk.slices) != 1:
            raise SpliceError(
                "mergekit slices that stack layers are not supported yet",
                where=what,
                fix="use one slice whose sources span every layer, or models:",
            )
        sl = mk.slices[0]
        base = sl.base_model or base
        if sl.residual_weight is not None:
            raise SpliceError("slice residual_weight is not supported", where=what)
        globals_.update(_mergekit_settings(alias, sl.parameters, "slices[0].parameters"))
        for src in sl.sources:
            if src.layer_range[0] != 0 or src.layer_range != sl.sources[0].layer_range:
                raise SpliceError(
                    "slice sources must all span the full layer range [0, num_layers]",
                    where=f"{what}: {src.model}",
                    fix="layer slicing/stacking is not supported yet",
                )
            entries.append((src.model, src.parameters))
        ranges = [sl.sources[0].layer_range[1]]
    else:
        entries = [(m.model, m.parameters) for m in mk.models or []]
    models = []
    has_base = False
    for i, (ref, params) in enumerate(entries):
        if base is not None and _same(ref, base):
            has_base = True
            if not alias.base_is_input:
                continue
        path, adapter = _model_ref(ref)
        settings = _mergekit_settings(alias, params, f"models[{i}].parameters")
        models.append(ModelSpec(path, adapter, settings))
    if alias.base_is_input and base is not None and not has_base:
        models.append(ModelSpec(*_model_ref(base)))
    return Recipe(
        method=alias.method,
        base=None if alias.base_is_input else base,
        models=models,
        settings=globals_,
        dtype=parse_dtype(mk.dtype),
        out_dtype=parse_dtype(mk.out_dtype, "out_dtype") or parse_dtype(mk.dtype),
        vocab="base" if mk.tokenizer_source == "base" else None,
        dialect="mergekit",
        source=raw,
        full_range_slices=ranges,
    )


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


def recipe_json(recipe: Recipe) -> str:
    """The recipe as given, for the output's metadata."""
    return json.dumps(recipe.source, sort_keys=True, default=str)
