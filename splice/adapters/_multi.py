"""Several named adapters on one model: activate, disable, delete, route rows, hotswap.

``add_adapter`` / ``load_adapter(model, dir, adapter_name=…)`` load them (see
:mod:`.inject`, :mod:`.files`); the functions here act on what is loaded. All of them work for
every method through the method's own ``Adapter.forward``/``delta`` (:mod:`.layer`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor, nn

from splice.errors import SpliceError

from ._routing import Rows, banks, hooks, rows_for
from .inject import _config, _record, _set_module, adapter_layers, adapter_names, adapter_state
from .layer import METHODS, AdaptedLayer, Adapter

__all__ = [
    "active_adapters",
    "delete_adapter",
    "disable_adapters",
    "hotswap_adapter",
    "mixed_batch",
    "set_active_adapters",
]


def _loaded(model: nn.Module, names: Sequence[str]) -> list[str]:
    loaded = adapter_names(model)
    if not loaded:
        raise SpliceError("model has no adapters", fix="call splice.adapters.inject first")
    for name in names:
        if name not in loaded:
            raise SpliceError(f"no adapter named {name!r} is loaded", fix=f"use one of {loaded}")
    return loaded


def active_adapters(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights (empty when disabled)."""
    _loaded(model, ())
    return dict(banks(model)[0].active)


def set_active_adapters(
    model: nn.Module, adapters: str | Sequence[str] | Mapping[str, float]
) -> nn.Module:
    """Make ``adapters`` act on every forward: one name, several (each weight 1), or a
    ``{name: weight}`` set whose output is y + Σ_k w_k·(change of adapter k); ``[]`` disables.

    Merged layers are re-merged with the new set's ΔW (Σ_k w_k·ΔW_k).
    """
    if isinstance(adapters, str):
        adapters = {adapters: 1.0}
    elif not isinstance(adapters, Mapping):
        adapters = dict.fromkeys(adapters, 1.0)
    _loaded(model, list(adapters))
    merged = [layer for layer in adapter_layers(model).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    for bank in banks(model):
        bank.active = tuple((n, float(w)) for n, w in adapters.items())
    for layer in merged:
        layer.merge()
    return model


def disable_adapters(model: nn.Module) -> nn.Module:
    """No adapter acts (the base model) until :func:`set_active_adapters`."""
    return set_active_adapters(model, ())


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` and every reference splice holds to its tensors (a merged one
    is unmerged first); a layer left without adapters becomes its base layer again."""
    loaded = _loaded(model, [name])
    bank = banks(model)[0]
    for site, layer in adapter_layers(model).items():
        if name not in layer.records:
            continue
        merged = layer.merged
        layer.unmerge()
        layer.get(name).detach()
        if layer.drop(name):
            _set_module(model, site, layer.base_layer)
        elif merged:
            bank.active, active = tuple(p for p in bank.active if p[0] != name), bank.active
            layer.merge()
            bank.active = active
    loaded.remove(name)
    bank.names[:] = loaded
    bank.active = tuple(p for p in bank.active if p[0] != name)
    if not loaded:
        hooks(model, add=False)
    return model


@contextmanager
def mixed_batch(model: nn.Module, rows: Sequence[str] | Rows) -> Iterator[nn.Module]:
    """Route the rows of the batches run inside: one adapter name per row (``"base"`` for
    none), or a :class:`~splice.adapters.Rows` (a row → adapter index, or per-row weights).

    ``model(x, adapter_names=[…])`` does the same for one call. Each row's output equals a
    forward of that row alone with its adapter active.

    Raises:
        SpliceError: a name that is not loaded (on entry), or a batch whose size differs from
            the number of rows (in the forward).
    """
    found = banks(model)
    if not found:
        raise SpliceError("model has no adapters", fix="call splice.adapters.inject first")
    checked = [rows_for(bank, rows) for bank in found]
    for bank, r in zip(found, checked, strict=True):
        bank.rows = r
    try:
        yield model
    finally:
        for bank in found:
            bank.rows = None


def hotswap_adapter(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    """Replace adapter ``name``'s weights by those of the adapter dir ``path``, in place.

    No module is replaced: the tensors are copied into the loaded ones, so a compiled model
    (``torch.compile``) keeps its graphs when the shapes (for LoRA: the rank) are the same.
    The method and the adapted layers must match; a config change that keeps every shape
    (LoRA's ``alpha``) is applied too — it changes a Python constant, so a compiled model
    recompiles once for it.

    Raises:
        SpliceError: another method, other layers, or tensors of other shapes.
    """
    from .files import _load_state, read_adapter

    record, layers = _record(model, name)
    info, tensors = read_adapter(Path(path))
    if info["method"] != record.method or set(info["sites"]) != set(layers):
        raise SpliceError(
            f"hotswap of {name!r} ({record.method}, {len(layers)} layers) needs an adapter of "
            f"the same method and layers, got {info['method']} on {len(info['sites'])} layers",
            where=str(path),
            fix="delete_adapter(model, name), then load_adapter(model, path, adapter_name=name)",
        )
    cfg = _config(METHODS.get(record.method), record.method, info["config"])
    changed = cfg != record.config
    if changed:  # fresh adapters of the new config: their shapes and constants
        sites = [layer.get(name).site for layer in layers.values()]
        fresh = METHODS.get(record.method)().build(sites, cfg)
        _check_shapes(name, layers, fresh, path)
    state = adapter_state(model, name)
    if set(state) != set(tensors):
        raise SpliceError(
            f"hotswap of {name!r}: the tensors differ from the loaded adapter's",
            where=str(path),
            fix="hotswap adapters saved from the same method, layers and options",
        )
    for key, t in tensors.items():
        if state[key].shape != t.shape:
            raise SpliceError(
                f"hotswap of {name!r}: {key} has shape {tuple(t.shape)}, the loaded adapter "
                f"{tuple(state[key].shape)}; hotswap needs the same shapes (rank)",
                where=str(path),
                fix="delete_adapter(model, name), then load_adapter(..., adapter_name=name)",
            )
    merged = [layer for layer in layers.values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    _load_state(model, dict(tensors), Path(path), name)  # packed adapters unpack their own
    if changed:
        for layer, new in zip(layers.values(), fresh, strict=True):
            _copy_constants(layer.get(name), new)
        record.config = cfg
    for layer in merged:
        layer.merge()
    return model


def _check_shapes(
    name: str, layers: dict[str, AdaptedLayer], fresh: list[Adapter], path: str | Path
) -> None:
    for (site, layer), new in zip(layers.items(), fresh, strict=True):
        old = layer.get(name).state_dict()
        for key, t in new.state_dict().items():
            if key in old and old[key].shape != t.shape:
                raise SpliceError(
                    f"hotswap of {name!r}: the new options give {key} the shape "
                    f"{tuple(t.shape)}, the loaded adapter {tuple(old[key].shape)}",
                    where=f"{path}:{site}",
                    fix="hotswap needs the same shapes (rank); delete and load it instead",
                )


def _copy_constants(old: Adapter, new: Adapter) -> None:
    """The Python constants of a freshly built adapter (scale, options) onto the loaded one."""
    for key, value in vars(new).items():
        if key.startswith("_") or key == "training" or isinstance(value, nn.Module | Tensor):
            continue
        if getattr(old, key, None) != value:
            setattr(old, key, value)
