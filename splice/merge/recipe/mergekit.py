"""mergekit's recipe dialect (``merge_method:``), for the methods both have, unchanged.

A mergekit recipe keeps mergekit's syntax (a bare list is a gradient) and semantics
(TIES/DARE per tensor, mergekit's defaults): :data:`_MERGEKIT` maps each mergekit method to a
splice method with mergekit's defaults and parameter renames. Features splice lacks (modules,
tokenizer surgery, chat templates, layer stacking) are errors that say so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from splice._schema import Strict, did_you_mean
from splice.errors import SpliceError
from splice.merge.recipe.settings import (
    Gradient,
    ModelSpec,
    Recipe,
    Rule,
    Setting,
    parse_dtype,
    parse_setting,
    recipe_error,
)

__all__ = ["MergekitRecipe", "from_mergekit"]


class _MkModel(Strict):
    model: str
    parameters: dict[str, Any] | None = None


class _MkSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class _MkSlice(Strict):
    sources: list[_MkSource]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    residual_weight: float | None = None


class MergekitRecipe(Strict):
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
_DELLA_RENAMES = {"rescale": ("rescale", lambda v: "l1" if v else "off")}
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
        {
            "consensus": "ties",
            "zero_sign": "positive",
            "rescale": "l1",
            "aggregate": "sum",
            "p": 0,
            "trim": 1.0,  # mergekit's dare_ties elects signs without the TIES trim
        },
        _DARE_RENAMES,
    ),
    "dare_linear": _Alias(
        "dare", {"consensus": None, "rescale": "l1", "aggregate": "sum", "p": 0}, _DARE_RENAMES
    ),
    # mergekit 0.1.5's other methods: splice's files of the same names (issue #31)
    **{m: _Alias(m) for m in ("sce", "model_stock", "nearswap", "arcee_fusion", "multislerp")},
    **{m: _Alias(m) for m in ("nuslerp", "breadcrumbs", "ram")},
    "breadcrumbs_ties": _Alias("breadcrumbs", {"consensus": "ties"}),
    "della": _Alias("della", {"rescale": "l1"}, _DELLA_RENAMES),
    "della_linear": _Alias(
        "della", {"consensus": None, "normalize": False, "rescale": "l1"}, _DELLA_RENAMES
    ),
    "karcher": _Alias("karcher", base_is_input=True),
    "ramplus_tl": _Alias("ram", {"plus": True}),
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


def _model_ref(ref: str) -> tuple[str, str | None]:
    """mergekit ``path`` or ``path+lora_path``; ``@revision`` is a hub feature."""
    if "+" in ref and not os.path.exists(ref):
        path, adapter = ref.split("+", 1)
        return path, adapter
    return ref, None


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def from_mergekit(raw: dict[str, Any], what: str) -> Recipe:
    """The :class:`Recipe` of a mergekit recipe ``raw`` read from ``what``."""
    try:
        mk = MergekitRecipe.model_validate(raw)
    except ValidationError as e:
        raise recipe_error(e, what, MergekitRecipe, _MkModel, _MkSlice, _MkSource) from None
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
        hint = did_you_mean(mk.merge_method, _MERGEKIT, label="supported")
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
