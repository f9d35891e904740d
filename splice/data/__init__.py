"""The data stage: the task registry, packaged tasks, local CSV/JSONL/image tasks, encoders.

A :class:`Task` reads a labelled dataset from a pinned package file (``splice/data/tasks/``,
one file per task, registered in :data:`TASKS`) or a local file (:func:`local_task`);
:func:`load_task` splits and caches it; :func:`load_encoder` gives the backbone that turns its
inputs into features. Used by ``splice train``, the benchmark and learned-merge recipes.
"""

from __future__ import annotations

from splice._registry import lazy_attributes

_LAZY = {
    "TASKS": "splice.data.registry",
    "Caps": "splice.data.registry",
    "Source": "splice.data.registry",
    "Split": "splice.data.registry",
    "Task": "splice.data.registry",
    "TaskData": "splice.data.registry",
    "load_task": "splice.data.registry",
    "stratified_split": "splice.data.registry",
    "local_task": "splice.data.local",
    "resolve_task": "splice.data.local",
    "Encoder": "splice.data.encoders",
    "Prepared": "splice.data.encoders",
    "load_encoder": "splice.data.encoders",
    "cache_root": "splice.data.cache",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
