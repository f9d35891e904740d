"""Merge fine-tuned models and adapters into one model, streaming, from a recipe.

``splice.merge(recipe, out)`` runs a recipe (a YAML path or a dict, splice's or mergekit's
format; see :mod:`splice.merge.recipe`) and writes an HF model dir atomically.
``merge_state_dicts`` runs any method on in-memory state dicts with the same engine. The
entry points live in :mod:`splice.merge.api`; this package only re-exports them.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from splice.merge.api import MergeOptions, build_job, merge, merge_state_dicts, plan_merge
from splice.merge.recipe import load_recipe

__all__ = ["MergeOptions", "build_job", "load_recipe", "merge", "merge_state_dicts", "plan_merge"]


class _CallableModule(types.ModuleType):
    """``splice.merge(recipe, out)`` calls :func:`merge` on the package itself."""

    def __call__(self, recipe: Any, out: str | Path, **kwargs: Any) -> Path:
        return merge(recipe, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
