"""The merge stage's entry points: run a recipe, plan it, or merge state dicts in memory.

:func:`merge` runs a recipe (a YAML path or a dict, splice's or mergekit's format; see
:mod:`splice.merge.recipe`) and writes an HF model dir (:mod:`splice.merge.output.model`) or,
with ``output: adapter``, one LoRA dir (:mod:`splice.merge.output.adapter`), atomically.
:func:`plan_merge` checks and plans it from headers alone. :func:`merge_state_dicts` runs any
method on in-memory state dicts with the same engine. The keyword options of :func:`merge`
and :func:`plan_merge` are the fields of :class:`~splice.merge.engine.job.MergeOptions`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice._schema import validate
from splice.deltas import DELTA_FORMAT, load_deltas, peft_lowrank_deltas
from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.io.peft import peft_full_tensors
from splice.merge import base as _base
from splice.merge.base import HyperParams, MergeTransform
from splice.merge.engine import (
    MergeJob,
    MergeOptions,
    Source,
    check,
    execute,
    plan,
)
from splice.merge.engine.memory import check_budget, estimate
from splice.merge.output.ledger import raw_names
from splice.merge.recipe import ParamResolver, Recipe, load_recipe, parse_dtype, parse_setting

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["MergeOptions", "build_job", "merge", "merge_state_dicts", "plan_merge"]

RecipeLike = str | Path | Mapping[str, Any] | Recipe
"""A recipe file, a recipe dict (either dialect) or a loaded :class:`Recipe`."""


def _open_source(
    path: str, adapter: str | None, label: str, model_type: str | None = None
) -> Source:
    """Open one input; ``model_type`` (the base's) tells a PEFT dir's GPT-2 Conv1D modules."""
    from splice.merge.pipeline import planned_input

    planned = planned_input(path)
    if planned is not None:  # a pipeline's intermediate, planned but not built yet
        return Source(path, planned, config=planned.config)
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
        return Source(
            path,
            None,
            peft_lowrank_deltas(ckpt, model_type=model_type),
            peft_full_tensors(ckpt),
            raw=raw_names(ckpt),
            checkpoints=[ckpt],
        )
    if ckpt.metadata.get("format") == DELTA_FORMAT:
        return Source(path, None, load_deltas(p), raw=raw_names(ckpt), checkpoints=[ckpt])
    src = Source(path, ckpt, config=ckpt.config, checkpoints=[ckpt])
    if adapter is not None:
        own_type = (ckpt.config or {}).get("model_type")
        extra = _open_source(adapter, None, f"{label} adapter", own_type)
        src.deltas, src.overrides, src.label = extra.deltas, extra.overrides, f"{path}+{adapter}"
        src.raw, src.checkpoints = extra.raw, [ckpt, *extra.checkpoints]
    return src


def _open_inputs(
    base_path: str | None, refs: list[tuple[str, str | None]]
) -> tuple[Source | None, list[Source]]:
    """Open the base and the models, with labels the ledger can key by (distinct)."""
    base = _open_source(base_path, None, "base") if base_path else None
    base_type = (base.config or {}).get("model_type") if base else None
    models = [
        _open_source(path, adapter, f"models[{i}]", base_type)
        for i, (path, adapter) in enumerate(refs)
    ]
    seen = {base.label} if base else set()
    for i, src in enumerate(models):
        if src.label in seen:
            src.label = f"{src.label} (models[{i}])"
        seen.add(src.label)
    return base, models


def _sliced(
    recipe: Recipe, method_cls: type[_base.MergeMethod]
) -> tuple[Source | None, list[Source], Any]:
    """Base, models and resolver of a ``slices:`` recipe (:mod:`splice.merge.engine.slices`);
    one slice over every layer of its models is an ordinary merge."""
    from splice.merge.engine.slices import SliceInput, SliceResolver, layer_count, stack_slices

    slices = recipe.slices or []
    with_base = {sl.base is not None for sl in slices}
    if len(with_base) > 1:
        raise SpliceError(
            "some slices have a base model and some do not",
            where=slices[0].where,
            fix="give every slice a base (base_model:) or none",
        )
    opened: dict[tuple[str, str | None], Source] = {}

    def inputs(sl: Any) -> list[SliceInput]:
        out = []
        for s in [sl.base] * (sl.base is not None) + sl.sources:
            key = (s.model.path, s.model.adapter)
            if key not in opened:
                opened[key] = _open_source(*key, s.where)
            inp = SliceInput(opened[key], s.layer_range, s.where, s.model.path, s.range_where)
            out.append(inp)
        return out

    grid = [inputs(sl) for sl in slices]
    resolvers = [
        ParamResolver(
            method_cls,
            sl.settings,
            [s.model.settings for s in sl.sources],
            [s.where for s in sl.sources],
            recipe.outer,
        )
        for sl in slices
    ]
    if len(grid) == 1 and all(
        i.layer_range == (0, layer_count(i.source, i.where)) for i in grid[0]
    ):
        sl = slices[0]
        base, models = _open_inputs(
            sl.base.model.path if sl.base else None,
            [(s.model.path, s.model.adapter) for s in sl.sources],
        )
        return base, models, resolvers[0]
    labels = []
    for i in range(len(grid[0])):
        label = ", ".join(f"{g[i].path}[{g[i].layer_range[0]}:{g[i].layer_range[1]}]" for g in grid)
        labels.append(f"base: {label}" if i == 0 and with_base == {True} else label)
    sources, place = stack_slices(grid, labels)
    base = sources[0] if with_base == {True} else None
    return base, sources[1:] if base else sources, SliceResolver(resolvers, place)


def _token_map(recipe: Recipe, base: Source | None, models: list[Source]) -> Any:
    """The recipe's tokenizer surgery as a :class:`~splice.merge.engine.vocab.TokenMap`;
    None without one (``tokenizer_source: base`` alone is the ``vocab: base`` policy)."""
    spec = recipe.tokenizer
    if spec is None or (spec.source == "base" and not spec.tokens and not spec.pad_to_multiple_of):
        return None
    from splice.merge.engine.vocab import token_map

    srcs = [s for s in (base, *models) if s is not None]
    return token_map(
        spec,
        [s.label for s in srcs],
        [getattr(s.weights, "dir", None) for s in srcs],
        [s.config for s in srcs],
        has_base=base is not None,
    )


def _transforms(spec: Mapping[str, Any] | None) -> list[tuple[MergeTransform, HyperParams]]:
    if spec is None:
        return []
    cls = _base.transforms.get("lines")
    params = validate(cls.Params, dict(spec), prefix="lines: ", fix="see `splice merge --list`")
    return [(cls(), params)]


def build_job(recipe: Recipe, options: MergeOptions | None = None) -> MergeJob:
    """Open every input (headers only) and assemble the engine's job for ``recipe``."""
    opts = options or MergeOptions()
    method_cls = _base.methods.get(recipe.method)
    if recipe.slices is not None:
        base, models, resolver = _sliced(recipe, method_cls)
    else:
        base, models = _open_inputs(recipe.base, [(m.path, m.adapter) for m in recipe.models])
        resolver = ParamResolver(
            method_cls,
            recipe.settings,
            [m.settings for m in recipe.models],
            [m.path for m in recipe.models],
            recipe.outer,
        )
    tokens = _token_map(recipe, base, models)
    return MergeJob(
        method=method_cls(),
        models=models,
        tokens=tokens,
        resolve=resolver,
        base=base,
        transforms=_transforms(recipe.lines),
        seed=recipe.seed if opts.seed is None else opts.seed,
        dtype=parse_dtype(opts.dtype, "--dtype") or recipe.dtype,
        out_dtype=parse_dtype(opts.out_dtype, "--out-dtype") or recipe.out_dtype,
        device=opts.device,
        allow_missing=opts.allow_missing,
        vocab=None if tokens is not None else recipe.vocab,
    )


def _is_pipeline(recipe: RecipeLike) -> bool:
    if not isinstance(recipe, str | Path):
        return False
    from splice.merge.recipe.multi import is_multi

    return is_multi(recipe)


def _prepare(recipe: RecipeLike, opts: MergeOptions) -> Recipe:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if opts.output is not None:
        if opts.output not in ("model", "adapter"):
            raise SpliceError(
                f"--output {opts.output!r}", fix="use --output model or --output adapter"
            )
        recipe.output = opts.output  # type: ignore[assignment]
    if opts.rank is not None:
        recipe.rank = "exact" if opts.rank == "exact" else int(opts.rank)
    if recipe.output == "adapter" and (recipe.slices or recipe.tokenizer):
        raise SpliceError(
            "an adapter output cannot stack layers or change the tokenizer",
            fix="drop --output adapter (write a model), or the slices / tokenizer settings",
        )
    return recipe


def plan_merge(recipe: RecipeLike, **options: Any) -> dict[str, Any]:
    """Preflight and memory plan of a merge from headers and configs; reads no tensor.

    ``options`` are :class:`~splice.merge.engine.job.MergeOptions` fields, as for
    :func:`merge`. Returns a JSON-ready report: the plan
    (:class:`~splice.merge.engine.memory.MemoryPlan`), tensor counts, the architecture found,
    the vocab report and the seconds the checks took.

    Raises:
        SpliceError: whatever the merge itself would refuse before computing, and a plan
            above ``max_memory``.
    """
    if _is_pipeline(recipe):
        from splice.merge.pipeline import plan_pipeline

        return plan_pipeline(recipe, options.pop("out", None), **options)  # type: ignore[arg-type]
    keep = options.pop("_keep", False)
    opts = MergeOptions(**options)
    start = time.perf_counter()
    recipe = _prepare(recipe, opts)
    if recipe.output == "adapter":
        from splice.merge.output.adapter import plan_adapter

        report = plan_adapter(recipe, build_job(recipe, opts))
    else:
        job = build_job(recipe, opts)
        checked = check(job)
        mem = estimate(job, checked.tasks, max_shard_size=opts.max_shard_size)
        report = {
            "output": "model",
            "method": recipe.method,
            "plan": mem.to_json(),
            "tensors": {
                "merged": sum(t.merge for t in checked.tasks),
                "copied": sum(not t.merge for t in checked.tasks),
                "dropped": len(checked.dropped),
            },
            "architecture": checked.arch.summary(),
            "vocab": checked.vocab,
            "untied": checked.untied,
        }
        if keep:  # for a pipeline's later stages (splice.merge.pipeline)
            from splice.merge.output.model import output_config
            from splice.merge.pipeline import PlannedCheckpoint

            ref = job.base or job.models[0]
            config = output_config(job, checked, ref) or ref.config
            report["_kept"] = PlannedCheckpoint.of("", checked.tasks, config, job.out_dtype)
    check_budget(report["plan"], opts.max_memory)
    report["preflight_seconds"] = round(time.perf_counter() - start, 3)
    return report


def merge(recipe: RecipeLike, out: str | Path, **options: Any) -> Path:
    """Run a merge recipe and write the merged model to ``out`` (an HF model dir).

    ``options`` are the fields of :class:`~splice.merge.engine.job.MergeOptions`: ``force``,
    ``max_shard_size``, ``device``, ``dtype``, ``out_dtype``, ``seed``, ``progress``,
    ``allow_missing``, ``max_memory``, ``output``, ``rank``, ``checksums``.
    Everything that headers can tell is checked before any tensor is read (the preflight,
    :func:`splice.merge.engine.preflight.check`); with ``max_memory`` the memory plan is checked
    too. The output is written to a temp dir beside ``out`` and renamed into place only on
    success, with ``splice-ledger.json`` (every input tensor merged, copied or dropped; input
    and output SHA-256; fidelity check). ``dtype``/``out_dtype``/``seed`` override the
    recipe's; ``output="adapter"`` (or the recipe's ``output: adapter``) merges LoRA adapter
    dirs into one LoRA adapter dir at ``rank`` (:mod:`splice.merge.output.adapter`).
    ``checksums=False`` leaves the SHA-256 of inputs and outputs out of the ledger (they cost
    about 1 s per GB on one core).

    Raises:
        SpliceError: a bad recipe, missing/incompatible inputs, NaN/Inf in an input or the
            output, a plan above ``max_memory``, ``out`` exists without ``force``.
    """
    if _is_pipeline(recipe):
        from splice.merge.pipeline import merge_pipeline

        done = merge_pipeline(recipe, out, **options)  # type: ignore[arg-type]
        return Path(done["out"] or options["intermediates"])
    opts = MergeOptions(**options)
    recipe = _prepare(recipe, opts)
    if opts.progress is None:
        opts = replace(opts, progress=sys.stderr.isatty())
    if recipe.output == "adapter":
        from splice.merge.output.adapter import merge_adapters

        return merge_adapters(recipe, out, opts, lambda: build_job(recipe, opts))
    job = build_job(recipe, opts)
    checked = check(job)
    if opts.max_memory is not None:
        mem = estimate(job, checked.tasks, max_shard_size=opts.max_shard_size)
        check_budget(mem.to_json(), opts.max_memory)
    from splice.merge.output.model import write_model  # after the checks: it imports torch

    return write_model(recipe, job, checked, Path(out), opts)


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
