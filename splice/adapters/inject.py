"""Injection, target matching and whole-model operations on adapted layers.

``inject(model, "lora", targets=["query", "value"], r=8)`` wraps every matched layer in an
:class:`~splice.adapters.layer.AdaptedLayer` that holds the frozen base layer and one method
adapter; the other functions here find, merge, unmerge, remove, count and collect those layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import pydantic
from torch import Tensor, nn

from splice._names import layer_index
from splice._schema import did_you_mean
from splice.deltas import Delta
from splice.errors import SpliceError

from ._routing import BASE, DEFAULT, _Bank, hooks
from ._sites import Site, make_site
from .layer import METHODS, AdaptedLayer, Adapter, Method, MethodConfig, _Record

__all__ = [
    "ParamCount",
    "adapter_deltas",
    "adapter_layers",
    "adapter_state",
    "add_adapter",
    "after_step",
    "attach",
    "aux_loss",
    "find_sites",
    "guide",
    "inject",
    "merge_adapters",
    "remove_adapters",
    "trainable_parameters",
    "unmerge_adapters",
]


# Target matching -------------------------------------------------------------------------------


def _matcher(targets: Sequence[str] | str):
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise SpliceError(f"bad target regex {targets!r}: {e}", fix="fix the pattern") from e
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def find_sites(
    model: nn.Module, targets: Sequence[str] | str, layers: Iterable[int] | None = None
) -> list[tuple[str, nn.Module, Site]]:
    """The adaptable layers matched by ``targets`` (name suffixes or a full-name regex).

    Raises:
        SpliceError: a target matches nothing, a match is not an adaptable layer type, or
            ``layers`` leaves nothing to adapt.
    """
    if not targets:
        raise SpliceError("no targets given", fix="pass targets=[...] (module name suffixes)")
    names = [n for n, _ in model.named_modules() if n and ".base_layer" not in n]
    for t in [targets] if isinstance(targets, str) else targets:
        if not any(map(_matcher(t if isinstance(targets, str) else [t]), names)):
            import difflib

            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            close = difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3)
            raise SpliceError(
                f"target {t!r} matches no module of {type(model).__name__}",
                fix=f"did you mean {close}?" if close else "print(model) to see module names",
            )
    match = _matcher(targets)
    keep = None if layers is None else set(layers)
    found: list[tuple[str, nn.Module, Site]] = []
    wrapped: list[str] = []  # adapted layers: their base layer is the site, their insides none
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, AdaptedLayer):
            wrapped.append(name)
        if not name or not match(name):
            continue
        idx = layer_index(name)
        if keep is not None and idx not in keep:
            continue
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        site = make_site(name, base, idx, name.rsplit(".", 1)[-1])
        if site is None:
            raise SpliceError(
                f"matched module is a {type(module).__name__}, not an adaptable layer",
                where=name,
                fix="target Linear, Conv, Embedding or GPT-2 Conv1D modules by a longer suffix",
            )
        found.append((name, module, site))
    if not found:
        raise SpliceError(
            f"layers={sorted(keep or [])} leaves no module to adapt",
            fix="module names carry their layer index (e.g. 'encoder.layer.3.'); check it",
        )
    return found


# Injection -------------------------------------------------------------------------------------


def _config(method: type[Method], name: str, config: dict[str, Any]) -> MethodConfig:
    try:
        return method.Config(**config)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            fix = did_you_mean(key, method.Config.model_fields, "options")
            raise SpliceError(f"unknown {name} option {key!r}", fix=fix) from None
        raise SpliceError(
            f"{name} option {key!r}: {err['msg']}", fix="see the method's docs"
        ) from None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def inject(
    model: nn.Module,
    method: str,
    targets: Sequence[str] | str,
    *,
    layers: Iterable[int] | None = None,
    modules_to_save: Sequence[str] = (),
    **config: Any,
) -> nn.Module:
    """Wrap the matched layers of ``model`` (in place) with ``method``'s adapters; returns it.

    Base parameters are frozen; adapter parameters and those of ``modules_to_save`` (e.g. a
    new classification head, matched like targets) train and are saved with the adapter.
    The adapter is named ``"default"``; :func:`add_adapter` adds more under other names.

    Args:
        model: any ``nn.Module`` (a ``transformers`` model needs no special case).
        method: a registered method name (``splice.adapters.METHODS.names()``).
        targets: module-name suffixes (``["query", "value"]``) or one regex on full names.
        layers: keep only modules whose name carries one of these layer indices.
        modules_to_save: modules trained in full and saved alongside (name suffixes).
        **config: the method's hyperparameters (its ``Config`` model; unknown keys fail).

    Raises:
        SpliceError: unknown method/option, a target matching nothing, an unsupported layer,
            or a model that already has adapters.
    """
    if adapter_layers(model):
        raise SpliceError(
            "model already has adapters",
            fix="remove_adapters(model) first, or add_adapter(model, name, ...) to add one",
        )
    return add_adapter(
        model, DEFAULT, method, targets, layers=layers, modules_to_save=modules_to_save, **config
    )


def add_adapter(
    model: nn.Module,
    name: str,
    method: str,
    targets: Sequence[str] | str,
    *,
    layers: Iterable[int] | None = None,
    modules_to_save: Sequence[str] = (),
    **config: Any,
) -> nn.Module:
    """Add a new adapter called ``name`` to ``model`` (which may hold others); returns it.

    As :func:`inject`, for a name not yet loaded. The new adapter trains; everything else,
    earlier adapters included, is frozen. It is not made active: the first adapter of a model
    is, later ones act once :func:`~splice.adapters.set_active_adapters` or a mixed batch names
    them. ``modules_to_save`` belongs to the model's first adapter only.
    """
    loaded = adapter_names(model)
    _check_name(name, loaded)
    if modules_to_save and loaded:
        raise SpliceError(
            f"adapter {name!r}: modules_to_save is kept only for a model's first adapter",
            fix="save the head with the first adapter, or load this one into its own model",
        )
    cls = METHODS.get(method)
    cfg = _config(cls, method, config)
    if loaded:
        record = _record(model)[0]
        for why in (
            cls().sharing_refused(cfg),
            METHODS.get(record.method)().sharing_refused(record.config),
        ):
            if why is not None:
                raise SpliceError(f"adapter {name!r}: {why}", fix="load it into a model of its own")
    impl = cls()
    found = impl.find(model, targets, layers, cfg)
    if found is None:  # a method with its own find checks its sites itself
        found = find_sites(model, targets, layers)
        for site_name, _, site in found:
            if site.kind not in cls.kinds:
                raise SpliceError(
                    f"{method} does not support {site.kind} layers",
                    where=site_name,
                    fix=f"target {sorted(cls.kinds)} layers only",
                )
    save_names = [n for n, _ in model.named_modules() if n and _matcher(modules_to_save)(n)]
    if modules_to_save and not save_names:
        raise SpliceError(f"modules_to_save {list(modules_to_save)} match no module")
    sites = [site for _, _, site in found]
    adapters = impl.build(sites, cfg)
    attach(model, found, adapters, method, cfg, targets, layers, modules_to_save, name=name)
    impl.attached(model, adapters, cfg)
    for n in save_names:
        model.get_submodule(n).requires_grad_(True)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters loaded into ``model``, in load order."""
    layers = adapter_layers(model)
    return list(next(iter(layers.values()))._bank.names) if layers else []


def _check_name(name: str, loaded: list[str]) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise SpliceError(
            f"adapter name {name!r} is not a plain name", fix="use letters, digits, '_' or '-'"
        )
    if name == BASE or hasattr(nn.ModuleDict(), name):
        raise SpliceError(f"adapter name {name!r} is reserved", fix="choose another name")
    if name in loaded:
        raise SpliceError(
            f"an adapter named {name!r} is already loaded",
            fix="delete_adapter(model, name) first, or hotswap_adapter to replace its weights",
        )


def attach(
    model: nn.Module,
    found: list[tuple[str, nn.Module, Site]],
    adapters: Sequence[Adapter],
    method: str,
    config: MethodConfig | None = None,
    targets: Sequence[str] | str = (),
    layers: Iterable[int] | None = None,
    modules_to_save: Sequence[str] = (),
    name: str = DEFAULT,
) -> None:
    """Freeze ``model`` and wrap each layer of ``found`` (:func:`find_sites`) with its adapter,
    called ``name`` (a layer already adapted gets it as one more named adapter).

    :func:`inject` builds the adapters from a registered method; a stage that builds its own
    (the continual methods of :mod:`splice.continual`) attaches them here, under its own name.
    """
    record = _Record(
        method,
        config or MethodConfig(),
        targets if isinstance(targets, str) else list(targets),
        None if layers is None else sorted(layers),
        list(modules_to_save),
        [site.name for _, _, site in found],
        {s.name: list(s.weight_shape) for _, _, s in found if hasattr(s, "weight_shape")},
    )
    for p in model.parameters():
        p.requires_grad_(False)
    existing = adapter_layers(model)
    bank = next(iter(existing.values()))._bank if existing else _Bank([], ((name, 1.0),))
    for (site_name, module, _), adapter in zip(found, adapters, strict=True):
        adapter = adapter.to(next(module.parameters()).device).train(module.training)
        if isinstance(module, AdaptedLayer):
            module.add(name, adapter, record)
        else:
            layer = AdaptedLayer(module, adapter, record, name, bank).train(module.training)
            _set_module(model, site_name, layer)
    bank.names.append(name)
    if not existing:
        hooks(model, add=True)


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _record(model: nn.Module, name: str | None = None) -> tuple[_Record, dict[str, AdaptedLayer]]:
    """Adapter ``name``'s record and layers (default: the first adapter loaded)."""
    layers = adapter_layers(model)
    if not layers:
        raise SpliceError("model has no adapters", fix="call splice.adapters.inject first")
    names = next(iter(layers.values()))._bank.names
    name = names[0] if name is None else name
    if name not in names:
        raise SpliceError(f"no adapter named {name!r} is loaded", fix=f"use one of {names}")
    layers = {n: layer for n, layer in layers.items() if name in layer.records}
    return next(iter(layers.values())).records[name], layers


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Unique parameter counts (a pool shared by several layers counts once)."""
    params = list(model.parameters())
    return ParamCount(
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    )


def adapter_deltas(model: nn.Module) -> dict[str, Delta]:
    """ΔW of every adapted layer keyed by the base tensor name (``….query.weight``), and Δb
    (``….bias``) where the method changes the bias too (IA³ on outputs)."""
    deltas: dict[str, Delta] = {}
    for name, layer in adapter_layers(model).items():
        deltas[f"{name}.weight"] = layer.delta()
        bias = layer.bias_delta()
        if bias is not None:
            deltas[f"{name}.bias"] = bias
    return deltas


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (idempotent); forward then costs nothing extra."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back (with ΔW merged in if ``merge``, else as they were)."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        for adapter in layer.named_adapters().values():
            adapter.detach()
        _set_module(model, name, layer.base_layer)
    hooks(model, add=False)
    return model


def _first(model: nn.Module) -> tuple[Method, list[Adapter], MethodConfig]:
    """The first adapter loaded: its method, its adapters (one per layer) and its config."""
    record, layers = _record(model)
    name = adapter_names(model)[0]
    return METHODS.get(record.method)(), [lay.get(name) for lay in layers.values()], record.config


def for_run(method: str, options: dict[str, Any], steps: int | None) -> dict[str, Any]:
    """``options`` with the run's length where the method's schedule needs it and the caller
    left it unset (AdaLoRA's ``total_step``: without it the rank allocation never runs, and
    peft refuses such a config). Unchanged for other methods and when ``steps`` is unknown."""
    from .layer import METHODS

    fields = METHODS.get(method).Config.model_fields
    if steps is None or "total_step" not in fields or options.get("total_step") is not None:
        return dict(options)
    return {**options, "total_step": steps}


def aux_loss(model: nn.Module) -> Tensor | None:
    """The method's auxiliary loss from the last training forward (MoLA balance, EPT task
    contrast), already weighted by its coefficient; ``None`` when the method has none."""
    method, adapters, cfg = _first(model)
    return method.aux_loss(adapters, cfg)


def guide(model: nn.Module) -> Any:
    """The method's teacher-guided gradient surgery (:meth:`Method.guide`), or ``None``."""
    method, adapters, cfg = _first(model)
    return method.guide(adapters, cfg)


def after_step(model: nn.Module, step: int) -> None:
    """Let the method act after optimizer step ``step`` (AdaLoRA prunes ranks); the one
    training loop calls it for the model it was given as ``aux`` (the first adapter loaded)."""
    method, adapters, cfg = _first(model)
    method.after_step(adapters, cfg, step)


def adapter_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """Adapter tensors (shared pools once, seeds and index maps included) + modules_to_save,
    of adapter ``adapter_name`` (default: the first loaded), keyed ``<site>.adapter.<key>``."""
    record, layers = _record(model, adapter_name)
    adapter_name = adapter_name or adapter_names(model)[0]
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, layer in layers.items():
        adapter = layer.get(adapter_name)
        packed = adapter.saved_tensors()
        if packed is not None:  # packed codes/bits instead of the parameters
            state.update({f"{name}.adapter.{k}": t.detach() for k, t in packed.items()})
            continue
        tensors = [*adapter.named_parameters(), *adapter.named_buffers()]
        persistent = set(adapter.state_dict(keep_vars=True))
        for key, t in tensors:
            if id(t) in seen or key not in persistent:
                continue
            seen.add(id(t))
            state[f"{name}.adapter.{key}"] = t.detach()
    for mod_name, module in model.named_modules():
        if mod_name and _matcher(record.modules_to_save)(mod_name):
            for key, t in module.state_dict().items():
                state[f"{mod_name}.{key}"] = t.detach()
    return state
