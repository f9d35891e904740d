"""splice: adapt and compose pretrained models.

The public surface is small and imported lazily, so ``import splice`` stays fast and plain
PyTorch use never imports ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SpliceError": "splice.errors",
    "open_checkpoint": "splice.io",
    "CheckpointWriter": "splice.io",
    "load_deltas": "splice.deltas",
    "save_deltas": "splice.deltas",
    "task_vector": "splice.deltas",
}

__all__ = ["__version__", "merge", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "merge":  # the module is callable: splice.merge(recipe, out)
        return importlib.import_module("splice.merge")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
