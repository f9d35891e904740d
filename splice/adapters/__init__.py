"""Trainable adapters injected around the layers of any ``nn.Module`` (spec peft.md §22).

    from splice.adapters import inject, merge_adapters, save_adapter
    inject(model, "lora", targets=["query", "value"], r=8, alpha=16)

Several named adapters share one model (``add_adapter``, ``load_adapter(…, adapter_name=)``,
``set_active_adapters``, ``delete_adapter``, ``hotswap_adapter``); a mixed batch gives each
row its own (``model(x, adapter_names=[…])`` or ``with mixed_batch(model, names):``).

Methods live one per file in this package (``lora.py``, …) and register themselves in
:data:`METHODS` (``METHODS.names()`` lists them); :mod:`.layer` holds the adapted layer and the
method protocol, :mod:`.inject` the injection and whole-model operations, :mod:`.files` the
splice and PEFT adapter formats.
"""

from __future__ import annotations

from ._multi import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    hotswap_adapter,
    mixed_batch,
    set_active_adapters,
)
from ._primitives import set_basis_cache
from ._routing import BASE, DEFAULT, Rows
from .files import load_adapter, save_adapter
from .inject import (
    ParamCount,
    adapter_deltas,
    adapter_layers,
    adapter_names,
    add_adapter,
    aux_loss,
    for_run,
    guide,
    inject,
    merge_adapters,
    remove_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from .layer import METHODS, AdaptedLayer, Adapter, Method

__all__ = [
    "BASE",
    "DEFAULT",
    "METHODS",
    "AdaptedLayer",
    "Adapter",
    "Method",
    "ParamCount",
    "Rows",
    "active_adapters",
    "adapter_deltas",
    "adapter_layers",
    "adapter_names",
    "add_adapter",
    "aux_loss",
    "delete_adapter",
    "disable_adapters",
    "for_run",
    "guide",
    "hotswap_adapter",
    "inject",
    "load_adapter",
    "merge_adapters",
    "mixed_batch",
    "remove_adapters",
    "save_adapter",
    "set_active_adapters",
    "set_basis_cache",
    "trainable_parameters",
    "unmerge_adapters",
]
