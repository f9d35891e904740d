"""Trainable adapters injected around the layers of any ``nn.Module`` (spec peft.md §22).

    from splice.adapters import inject, merge_adapters, save_adapter
    inject(model, "lora", targets=["query", "value"], r=8, alpha=16)

Methods live one per file in this package (``lora.py``, …) and register themselves in
:data:`METHODS` (``METHODS.names()`` lists them); :mod:`.layer` holds the adapted layer and the
method protocol, :mod:`.inject` the injection and whole-model operations, :mod:`.files` the
splice and PEFT adapter formats.
"""

from __future__ import annotations

from ._primitives import set_basis_cache
from .files import load_adapter, save_adapter
from .inject import (
    ParamCount,
    adapter_deltas,
    adapter_layers,
    aux_loss,
    guide,
    inject,
    merge_adapters,
    remove_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from .layer import METHODS, AdaptedLayer, Adapter, Method

__all__ = [
    "METHODS",
    "AdaptedLayer",
    "Adapter",
    "Method",
    "ParamCount",
    "adapter_deltas",
    "adapter_layers",
    "aux_loss",
    "guide",
    "inject",
    "load_adapter",
    "merge_adapters",
    "remove_adapters",
    "save_adapter",
    "set_basis_cache",
    "trainable_parameters",
    "unmerge_adapters",
]
