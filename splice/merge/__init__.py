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
from splice.merge.engine import Checked, MergeJob, Source, check, execute, layer_indices, plan
from splice.merge.ledger import build_ledger
from splice.merge.recipe import (
    ParamResolver,
    Recipe,
    load_recipe,
    parse_dtype,
    parse_setting,
    recipe_json,
)

__all__ = ["load_recipe", "merge", "merge_state_dicts", "plan_merge"]


def _open_source(path: str, adapter: str | None, label: str) -> Source:
    from splice.deltas import DELTA_FORMAT, load_deltas, peft_lowrank_deltas
    from splice.io import open_checkpoint
    from splice.io.peft import peft_full_tensors
    from splice.merge.ledger import raw_names

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
            peft_lowrank_deltas(ckpt),
            peft_full_tensors(ckpt),
            raw=raw_names(ckpt),
            checkpoints=[ckpt],
        )
    if ckpt.metadata.get("format") == DELTA_FORMAT:
        return Source(path, None, load_deltas(p), raw=raw_names(ckpt), checkpoints=[ckpt])
    src = Source(path, ckpt, config=ckpt.config, checkpoints=[ckpt])
    if adapter is not None:
        extra = _open_source(adapter, None, f"{label} adapter")
        src.deltas, src.overrides, src.label = extra.deltas, extra.overrides, f"{path}+{adapter}"
        src.raw, src.checkpoints = extra.raw, [ckpt, *extra.checkpoints]
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
    allow_missing: bool = False,
) -> MergeJob:
    """Open every input (headers only) and assemble the engine's job for ``recipe``."""
    method_cls = _base.methods.get(recipe.method)
    base = _open_source(recipe.base, None, "base") if recipe.base else None
    models = [_open_source(m.path, m.adapter, f"models[{i}]") for i, m in enumerate(recipe.models)]
    seen = {base.label} if base else set()
    for i, src in enumerate(models):  # the ledger keys inputs by label: keep them distinct
        if src.label in seen:
            src.label = f"{src.label} (models[{i}])"
        seen.add(src.label)
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
        allow_missing=allow_missing,
        vocab=recipe.vocab,
    )


def _checked(
    recipe: Recipe,
    device: str,
    dtype: str | None,
    out_dtype: str | None,
    seed: int | None,
    allow_missing: bool,
) -> tuple[MergeJob, Checked]:
    """The job of ``recipe`` and its preflight (:func:`~splice.merge.engine.check`)."""
    job = build_job(
        recipe,
        device=device,
        dtype=dtype,
        out_dtype=out_dtype,
        seed=seed,
        allow_missing=allow_missing,
    )
    return job, check(job)


def _prepare(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    *,
    output: str | None,
    rank: int | str | None,
) -> Recipe:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if output is not None:
        if output not in ("model", "adapter"):
            raise SpliceError(f"--output {output!r}", fix="use --output model or --output adapter")
        recipe.output = output  # type: ignore[assignment]
    if rank is not None:
        recipe.rank = "exact" if rank == "exact" else int(rank)
    return recipe


def plan_merge(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    *,
    max_shard_size: int | str = "5GB",
    device: str = "cpu",
    dtype: str | None = None,
    out_dtype: str | None = None,
    seed: int | None = None,
    allow_missing: bool = False,
    max_memory: int | str | None = None,
    output: str | None = None,
    rank: int | str | None = None,
) -> dict[str, Any]:
    """Preflight and memory plan of a merge from headers and configs; reads no tensor.

    Returns a JSON-ready report: the plan (:class:`~splice.merge.memory.MemoryPlan`), tensor
    counts, the architecture found, the vocab report and the seconds the checks took.

    Raises:
        SpliceError: whatever the merge itself would refuse before computing, and a plan
            above ``max_memory``.
    """
    import time

    from splice.merge.memory import estimate

    start = time.perf_counter()
    recipe = _prepare(recipe, output=output, rank=rank)
    if recipe.output == "adapter":
        from splice.merge.adapter_out import plan_adapter

        report = plan_adapter(recipe, device=device, dtype=dtype, seed=seed)
    else:
        job, checked = _checked(recipe, device, dtype, out_dtype, seed, allow_missing)
        mem = estimate(job, checked.tasks, max_shard_size=max_shard_size)
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
    _check_budget(report["plan"], max_memory)
    report["preflight_seconds"] = round(time.perf_counter() - start, 3)
    return report


def _check_budget(plan: Mapping[str, Any], max_memory: int | str | None) -> None:
    if max_memory is None:
        return
    from splice.io import human_bytes, parse_size

    limit = parse_size(max_memory)
    if plan["total_ram"] > limit:
        raise SpliceError(
            f"the merge needs {human_bytes(plan['total_ram'])} of RAM "
            f"({human_bytes(plan['peak_ram'])} for {plan['largest']!r} on top of "
            f"{human_bytes(plan['baseline_ram'] + plan['first_use_ram'])} for the process), "
            f"above --max-memory {human_bytes(limit)}",
            fix="raise --max-memory, merge fewer models at once, or use a float16/bfloat16 "
            "--dtype (halves the working set)",
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
    allow_missing: bool = False,
    max_memory: int | str | None = None,
    output: str | None = None,
    rank: int | str | None = None,
    checksums: bool = True,
) -> Path:
    """Run a merge recipe and write the merged model to ``out`` (an HF model dir).

    Everything that headers can tell is checked before any tensor is read (the preflight,
    :func:`splice.merge.engine.check`); with ``max_memory`` the memory plan is checked too.
    The output is written to a temp dir beside ``out`` and renamed into place only on
    success, with ``splice-ledger.json`` (every input tensor merged, copied or dropped; input
    and output SHA-256; fidelity check). ``dtype``/``out_dtype``/``seed`` override the
    recipe's; ``output="adapter"`` (or the recipe's ``output: adapter``) merges LoRA adapter
    dirs into one LoRA adapter dir at ``rank`` (:mod:`splice.merge.adapter_out`).
    ``checksums=False`` leaves the SHA-256 of inputs and outputs out of the ledger (they cost
    about 1 s per GB on one core).

    Raises:
        SpliceError: a bad recipe, missing/incompatible inputs, NaN/Inf in an input or the
            output, a plan above ``max_memory``, ``out`` exists without ``force``.
    """
    recipe = _prepare(recipe, output=output, rank=rank)
    if progress is None:
        progress = sys.stderr.isatty()
    if recipe.output == "adapter":
        from splice.merge.adapter_out import merge_adapters

        return merge_adapters(
            recipe,
            out,
            force=force,
            device=device,
            dtype=dtype,
            seed=seed,
            progress=progress,
            max_memory=max_memory,
            checksums=checksums,
        )
    job, checked = _checked(recipe, device, dtype, out_dtype, seed, allow_missing)
    if max_memory is not None:
        from splice.merge.memory import estimate

        mem = estimate(job, checked.tasks, max_shard_size=max_shard_size)
        _check_budget(mem.to_json(), max_memory)
    return _write_model(recipe, job, checked, Path(out), force, max_shard_size, progress, checksums)


def _write_model(
    recipe: Recipe,
    job: MergeJob,
    checked: Checked,
    out: Path,
    force: bool,
    max_shard_size: int | str,
    progress: bool,
    checksums: bool,
) -> Path:
    from splice import __version__
    from splice.io import CheckpointWriter
    from splice.merge.fidelity import OutputCheck
    from splice.merge.ledger import LEDGER_NAME, StreamHasher, input_files, unhashed

    tasks = checked.tasks
    meta = {
        "splice.version": __version__,
        "splice.method": recipe.method,
        "splice.seed": str(job.seed),
        "splice.recipe": recipe_json(recipe),
    }
    ref = job.base or job.models[0]
    ref_dir = getattr(ref.weights, "dir", None)
    files_from = _tokenizer_dir(job, checked) or ref_dir
    inputs = [p for p in (recipe.base, *(m.path for m in recipe.models)) if p]
    inputs += [m.adapter for m in recipe.models if m.adapter]
    hasher = StreamHasher(job.sources() if checksums else [])
    job.on_read = hasher.feed if checksums else None
    check_output = OutputCheck()
    with CheckpointWriter(
        out,
        max_shard_size=max_shard_size,
        force=force,
        copy_files_from=files_from,
        metadata=meta,
        protect=inputs,
        layout=[
            (t.name, t.shape, (job.out_dtype or t.dtype) if t.merge else t.dtype) for t in tasks
        ],
        checksums=checksums,
    ) as writer:
        stats = execute(job, tasks, writer, progress=progress, on_output=check_output)
        added: dict[str, bytes] = {}
        config = _output_config(job, checked, ref)
        if config is not None:
            added["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        if files_from is not None and ref_dir is not None and files_from != ref_dir:
            gen = Path(ref_dir) / "generation_config.json"
            if gen.is_file():
                added["generation_config.json"] = gen.read_bytes()
        for name, content in added.items():
            writer.add_file(name, content)
        job.check_unchanged()
        outputs = _output_hashes(writer, files_from, added, checksums)
        digests = {
            s.label: hasher.digests(input_files(s)) if checksums else unhashed(input_files(s))
            for s in job.sources()
        }
        ledger = build_ledger(
            job=job,
            checked=checked,
            recipe=recipe.source,
            method=recipe.method,
            stats=stats,
            digests=digests,
            outputs=outputs,
            fidelity=check_output.summary(),
        )
        writer.add_file(LEDGER_NAME, json.dumps(ledger, indent=1) + "\n")
    return out


def _tokenizer_dir(job: MergeJob, checked: Checked) -> Path | None:
    """Under a vocab policy, the dir of the input whose rows were kept (its tokenizer)."""
    if checked.vocab is None:
        return None
    label = checked.vocab["tokenizer_from"]
    src = next(s for s in job.sources() if s.label == label)
    return getattr(src.weights, "dir", None)


def _output_config(job: MergeJob, checked: Checked, ref: Source) -> dict[str, Any] | None:
    """The reference's config.json with what the merge changed: dtype, vocab size, ties."""
    if ref.config is None:
        return None
    config = dict(ref.config)
    if job.out_dtype is not None:
        config["torch_dtype"] = str(job.out_dtype).removeprefix("torch.")
    if checked.vocab is not None:
        config["vocab_size"] = checked.vocab["vocab_size"]
    if checked.untied:
        config["tie_word_embeddings"] = False
    return config if config != ref.config or checked.vocab is not None else None


def _output_hashes(
    writer: Any, files_from: Path | None, added: Mapping[str, bytes], checksums: bool = True
) -> dict[str, str | None]:
    """SHA-256 of every output file but the ledger, before the temp dir is renamed.

    Shards were hashed as they were written (:meth:`CheckpointWriter.shard_digests`); copied
    and added files are hashed from their sources. The index is derived from the shards and
    is not hashed.
    """
    import hashlib

    from splice.io._hash import hash_files
    from splice.io.writer import AUX_FILES

    copied = [Path(files_from) / a for a in AUX_FILES if a not in added] if files_from else []
    copied = [p for p in copied if p.is_file()]
    if not checksums:
        finals = [final for _, final in writer.shard_files()]
        return dict.fromkeys(sorted([*finals, *(p.name for p in copied), *added]))
    out: dict[str, str | None] = dict(writer.shard_digests())
    for p, h in hash_files(copied).items():
        out[Path(p).name] = h
    for name, content in added.items():
        out[name] = hashlib.sha256(content).hexdigest()
    return dict(sorted(out.items()))


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
