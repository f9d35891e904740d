"""Merge fine-tuned models and adapters into one model, streaming, from a recipe.

``splice.merge(recipe, out)`` runs a recipe (a YAML path or a dict, splice's or mergekit's
format; see :mod:`splice.merge.recipe`) and writes an HF model dir atomically.
``merge_state_dicts`` runs any method on in-memory state dicts with the same engine.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge import base as _base
from splice.merge.base import HyperParams, MergeTransform
from splice.merge.engine import MergeJob, Source, execute, layer_indices, plan
from splice.merge.recipe import (
    ParamResolver,
    Recipe,
    load_recipe,
    parse_dtype,
    parse_setting,
    recipe_json,
)

__all__ = ["load_recipe", "merge", "merge_state_dicts"]


def _open_source(path: str, adapter: str | None, label: str) -> Source:
    from splice.deltas import DELTA_FORMAT, load_deltas
    from splice.io import open_checkpoint
    from splice.io.peft import peft_full_tensors, peft_lowrank_deltas

    p = Path(path)
    if not p.exists():
        raise SpliceError(
            "model path does not exist",
            where=f"{label}: {path}",
            fix="paths are local files or dirs (splice never downloads from a model hub)",
        )
    ckpt = open_checkpoint(p)
    if ckpt.format == "peft":
        if adapter is not None:
            raise SpliceError("an adapter cannot be applied to an adapter", where=path)
        return Source(path, None, peft_lowrank_deltas(ckpt), peft_full_tensors(ckpt))
    if ckpt.metadata.get("format") == DELTA_FORMAT:
        return Source(path, None, load_deltas(p))
    src = Source(path, ckpt, config=ckpt.config)
    if adapter is not None:
        extra = _open_source(adapter, None, f"{label} adapter")
        src.deltas, src.overrides, src.label = extra.deltas, extra.overrides, f"{path}+{adapter}"
    return src


def _transforms(spec: Mapping[str, Any] | None) -> list[tuple[MergeTransform, HyperParams]]:
    if spec is None:
        return []
    from pydantic import ValidationError

    cls = _base.transforms.get("lines")
    try:
        params = cls.Params.model_validate(dict(spec))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SpliceError(f"lines: {loc}: {err['msg']}", fix="see `splice merge --list`") from None
    return [(cls(), params)]


def build_job(
    recipe: Recipe,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    out_dtype: str | None = None,
    seed: int | None = None,
) -> MergeJob:
    """Open every input (headers only) and assemble the engine's job for ``recipe``."""
    method_cls = _base.methods.get(recipe.method)
    base = _open_source(recipe.base, None, "base") if recipe.base else None
    models = [_open_source(m.path, m.adapter, f"models[{i}]") for i, m in enumerate(recipe.models)]
    if recipe.full_range_slices and (base or models[0]).weights is not None:
        ref = base or models[0]
        stacks = {n for _, n in layer_indices(list(ref.weights or {})).values()}
        if stacks and recipe.full_range_slices[0] not in stacks:
            raise SpliceError(
                f"slice layer_range ends at {recipe.full_range_slices[0]}, "
                f"but the model has {max(stacks)} layers",
                fix="layer slicing is not supported yet; span all layers",
            )
    resolver = ParamResolver(
        method_cls,
        recipe.settings,
        [m.settings for m in recipe.models],
        [m.path for m in recipe.models],
    )
    return MergeJob(
        method=method_cls(),
        models=models,
        resolve=resolver,
        base=base,
        transforms=_transforms(recipe.lines),
        seed=recipe.seed if seed is None else seed,
        dtype=parse_dtype(dtype, "--dtype") or recipe.dtype,
        out_dtype=parse_dtype(out_dtype, "--out-dtype") or recipe.out_dtype,
        device=device,
    )


def merge(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    out: str | Path,
    *,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    device: str = "cpu",
    dtype: str | None = None,
    out_dtype: str | None = None,
    seed: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Run a merge recipe and write the merged model to ``out`` (an HF model dir).

    Everything that headers can tell is checked before any tensor is read; the output is
    written to a temp dir beside ``out`` and renamed into place only on success.
    ``dtype``/``out_dtype``/``seed`` override the recipe's.

    Raises:
        SpliceError: a bad recipe, missing/incompatible inputs, NaN/Inf in an input,
            ``out`` exists without ``force``.
    """
    from splice import __version__
    from splice.io import CheckpointWriter

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    job = build_job(recipe, device=device, dtype=dtype, out_dtype=out_dtype, seed=seed)
    tasks = plan(job)
    meta = {
        "splice.version": __version__,
        "splice.method": recipe.method,
        "splice.seed": str(job.seed),
        "splice.recipe": recipe_json(recipe),
    }
    ref = job.base or job.models[0]
    ref_dir = getattr(ref.weights, "dir", None)
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(out)
    inputs = [p for p in (recipe.base, *(m.path for m in recipe.models)) if p]
    inputs += [m.adapter for m in recipe.models if m.adapter]
    with CheckpointWriter(
        out,
        max_shard_size=max_shard_size,
        force=force,
        copy_files_from=ref_dir,
        metadata=meta,
        protect=inputs,
        layout=[
            (t.name, t.shape, (job.out_dtype or t.dtype) if t.merge else t.dtype) for t in tasks
        ],
    ) as writer:
        execute(job, tasks, writer, progress=progress)
        if job.out_dtype is not None and ref.config is not None:
            config = dict(ref.config)
            config["torch_dtype"] = str(job.out_dtype).removeprefix("torch.")
            writer.add_file("config.json", json.dumps(config, indent=2) + "\n")
    return out


class _Collect(dict):
    def write(self, name: str, tensor: Tensor) -> None:
        self[name] = tensor


def merge_state_dicts(
    method: str,
    models: list[Mapping[str, Tensor]],
    *,
    base: Mapping[str, Tensor] | None = None,
    params: Mapping[str, Any] | None = None,
    model_params: list[Mapping[str, Any]] | None = None,
    lines: Mapping[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Merge in-memory state dicts with the streaming engine; inputs are never modified.

    ``params``/``model_params`` use splice recipe syntax (a value may be ``{gradient: …}``
    or a filter list). Returns ``{name: tensor}`` in the base's dtype (or the first model's).
    """
    method_cls = _base.methods.get(method)
    labels = [f"models[{i}]" for i in range(len(models))]
    mps = list(model_params or [{} for _ in models])
    if len(mps) != len(models):
        raise SpliceError(f"{len(mps)} model_params for {len(models)} models")
    resolver = ParamResolver(
        method_cls,
        {k: parse_setting(v, f"params.{k}", mergekit=False) for k, v in (params or {}).items()},
        [
            {k: parse_setting(v, f"{lab}.{k}", mergekit=False) for k, v in mp.items()}
            for lab, mp in zip(labels, mps, strict=True)
        ],
        labels,
    )
    job = MergeJob(
        method=method_cls(),
        models=[Source(lab, m) for lab, m in zip(labels, models, strict=True)],
        resolve=resolver,
        base=Source("base", base) if base is not None else None,
        transforms=_transforms(lines),
        seed=seed,
        dtype=dtype,
        device=device,
    )
    out = _Collect()
    execute(job, plan(job), out)
    return dict(out)


class _CallableModule(types.ModuleType):
    """``splice.merge(recipe, out)`` calls :func:`merge` on the package itself."""

    def __call__(self, recipe: Any, out: str | Path, **kwargs: Any) -> Path:
        return merge(recipe, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
