"""Training: THE one loop (:func:`fit`, :class:`TrainStep`) and ``splice train`` on top of it.

``splice train`` fine-tunes a local Hugging Face model with any registered adapter, or in
full (:func:`train`, :class:`TrainConfig`); the benchmark's fine-tunes and every later stage
take their optimizer steps through :func:`fit` too.
"""

from __future__ import annotations

from splice._registry import lazy_attributes

_LAZY = {
    "TrainConfig": "splice.train.config",
    "train": "splice.train.hf",
    "LoopState": "splice.train.loop",
    "TrainStep": "splice.train.loop",
    "fit": "splice.train.loop",
    "minimise": "splice.train.loop",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
