"""mergekit's recipe dialect (``merge_method:``), for the methods both have, unchanged.

A mergekit recipe keeps mergekit's syntax (a bare list is a gradient) and semantics
(TIES/DARE per tensor, mergekit's defaults): :data:`_MERGEKIT` maps each mergekit method to a
splice method with mergekit's defaults and parameter renames. ``slices:`` that stack or cut
layers run through :mod:`splice.merge.engine.slices`; a ``modules:`` block with one module is
that module's recipe (its ``parameters`` a precedence level of their own); tokenizer surgery
is :mod:`.tokenizer`. Chat templates and multi-module (VLM) recipes are errors that say so.
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
    SliceSource,
    SliceSpec,
    parse_dtype,
    parse_setting,
    recipe_error,
)
from splice.merge.recipe.tokenizer import parse_tokenizer
from splice.merge.recipe.where import Where

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
    "passthrough": _Alias("passthrough", base_is_input=True),
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
    "sce": _Alias("sce", {"mergekit_exact": True}),
    "multislerp": _Alias("multislerp", {"mergekit_norms": True}),
    **{m: _Alias(m) for m in ("model_stock", "nearswap", "arcee_fusion")},
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


class _MkModule(Strict):
    models: list[_MkModel] | None = None
    slices: list[_MkSlice] | None = None
    parameters: dict[str, Any] | None = None


def _one_module(mk: MergekitRecipe, where: Where) -> tuple[_MkModule, str | None]:
    """The recipe's ``models:``/``slices:`` as one module, and the module's name if given."""
    given = [k for k in ("models", "slices", "modules") if getattr(mk, k) is not None]
    if len(given) != 1:
        raise SpliceError(
            f"exactly one of models:, slices: and modules: is needed, got {given or 'none'}",
            where=where(),
        )
    if mk.modules is None:
        return _MkModule(models=mk.models, slices=mk.slices), None
    if len(mk.modules) != 1:
        raise SpliceError(
            f"modules: has {len(mk.modules)} modules ({', '.join(mk.modules)}); splice merges "
            "single-module models",
            where=where("modules"),
            fix="merge each module's checkpoint on its own, or use models:/slices:",
        )
    ((name, raw),) = mk.modules.items()
    try:
        module = _MkModule.model_validate(raw)
    except ValidationError as e:
        raise recipe_error(e, where("modules", name), _MkModule, _MkModel, _MkSlice) from None
    if (module.models is None) == (module.slices is None):
        raise SpliceError(
            "a module needs exactly one of models: and slices:", where=where("modules", name)
        )
    return module, name


def from_mergekit(raw: dict[str, Any], what: str, where: Where | None = None) -> Recipe:
    """The :class:`Recipe` of a mergekit recipe ``raw`` read from ``what``.

    Parameter precedence is mergekit's: slice source > slice > module > per-model > global
    ``parameters`` > the method's mergekit defaults; a filter list that matches no tensor name
    falls through to the next level.
    """
    where = where or Where(what)
    try:
        mk = MergekitRecipe.model_validate(raw)
    except ValidationError as e:
        raise recipe_error(e, what, MergekitRecipe, _MkModel, _MkSlice, _MkSource) from None
    if mk.chat_template is not None:
        raise SpliceError(
            "mergekit chat templates (chat_template:) are not supported yet",
            where=where("chat_template"),
            fix="remove `chat_template:`; the chosen tokenizer's files are copied as they are",
        )
    alias = _MERGEKIT.get(mk.merge_method)
    if alias is None:
        hint = did_you_mean(mk.merge_method, _MERGEKIT, label="supported")
        raise SpliceError(
            f"mergekit method {mk.merge_method!r} is not in splice",
            where=where("merge_method"),
            fix=hint,
        )
    module, mod_name = _one_module(mk, where)
    mod_where = ("modules", mod_name) if mod_name is not None else ()
    base = mk.base_model
    outer: list[dict[str, Setting]] = []
    if module.parameters:
        outer.append(_mergekit_settings(alias, module.parameters, "/".join(map(str, mod_where))))
    outer.append(_mergekit_settings(alias, mk.parameters, "parameters"))
    outer.append(dict(alias.defaults))
    tok = parse_tokenizer(mk.tokenizer_source, mk.tokenizer, where)
    common: dict[str, Any] = {
        "method": alias.method,
        "settings": {},
        "outer": outer,
        "dtype": parse_dtype(mk.dtype),
        "out_dtype": parse_dtype(mk.out_dtype, "out_dtype") or parse_dtype(mk.dtype),
        "vocab": "base" if mk.tokenizer_source == "base" else None,
        "tokenizer": tok,
        "dialect": "mergekit",
        "source": raw,
        "where": where,
    }
    if module.slices is not None:
        slices = [
            _slice(alias, sl, base, (*mod_where, "slices", i), where)
            for i, sl in enumerate(module.slices)
        ]
        return Recipe(base=base, models=[], slices=slices, **common)
    models = []
    has_base = False
    for i, m in enumerate(module.models or []):
        if base is not None and _same(m.model, base):
            has_base = True
            if not alias.base_is_input:
                continue
        path, adapter = _model_ref(m.model)
        key = (*mod_where, "models", i, "parameters")
        settings = _mergekit_settings(alias, m.parameters, where(*key))
        models.append(ModelSpec(path, adapter, settings))
    if alias.base_is_input and base is not None and not has_base:
        models.append(ModelSpec(*_model_ref(base)))
    return Recipe(base=None if alias.base_is_input else base, models=models, **common)


def _slice(
    alias: _Alias, sl: _MkSlice, base: str | None, key: tuple[Any, ...], where: Where
) -> SliceSpec:
    """One output slice: its non-base sources, its base (a source, or the recipe's)."""
    if sl.residual_weight is not None:
        raise SpliceError(
            "slice residual_weight is not supported",
            where=where(*key, "residual_weight"),
            fix="remove residual_weight (mergekit ignores it as well)",
        )
    base = sl.base_model or base
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
    for j, src in enumerate(sl.sources):
        lo, hi = src.layer_range
        if lo < 0 or hi <= lo:
            raise SpliceError(
                f"layer_range [{lo}, {hi}] is empty or negative",
                where=where(*key, "sources", j, "layer_range"),
                fix="write [start, stop) with 0 <= start < stop",
            )
    if len(lengths) > 1:
        raise SpliceError(
            f"the sources of one slice span different layer counts {sorted(lengths)}",
            where=where(*key, "sources"),
            fix="give every source of a slice a layer_range of the same length",
        )
    sources, base_src = [], None
    for j, src in enumerate(sl.sources):
        spec = SliceSource(
            ModelSpec(
                *_model_ref(src.model),
                _mergekit_settings(alias, src.parameters, where(*key, "sources", j)),
            ),
            src.layer_range,
            where(*key, "sources", j),
            where(*key, "sources", j, "layer_range"),
        )
        if base is not None and _same(src.model, base):
            base_src = spec
            if not alias.base_is_input:
                continue
        sources.append(spec)
    if base is not None and base_src is None:  # the base at the first source's layers
        first = sl.sources[0].layer_range
        base_src = SliceSource(ModelSpec(*_model_ref(base)), first, where(*key))
    return SliceSpec(
        sources,
        None if alias.base_is_input else base_src,
        _mergekit_settings(alias, sl.parameters, where(*key, "parameters")),
        where(*key),
    )
