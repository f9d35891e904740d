"""The streaming merge executor: one tensor name at a time, through every input.

:func:`plan` checks everything that headers can tell (names, shapes, dtypes, configs,
parameters) before any tensor is read. :func:`execute` then streams the statistics passes
the method (and its transforms) ask for, and the merge pass: for each name of the base it
reads that tensor from every input — full checkpoints, or the base plus one materialized
adapter delta — calls the method, and hands the result to a sink (the atomic sharded writer,
or a dict). Peak memory is the inputs of one name plus chunk-sized scratch; it does not grow
with the number of tensors. Integer/bool buffers are copied from the base.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from splice.deltas import Delta
from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeContext, MergeMethod, MergeTransform
from splice.merge.stats import one_thread

__all__ = [
    "MergeJob",
    "Resolver",
    "Sink",
    "Source",
    "TensorTask",
    "execute",
    "layer_indices",
    "plan",
]

Resolver = Callable[[str | None, float], tuple[HyperParams, list[HyperParams]]]
"""``(tensor name or None for model level, depth) -> (params, per-input params)``."""


class Sink(Protocol):
    def write(self, name: str, tensor: Tensor) -> None: ...


@dataclass
class Source:
    """One merge input, read one tensor at a time.

    ``weights`` holds full tensors (a lazy :class:`~splice.io.Checkpoint` or a dict); without
    it the input is the base. ``overrides`` replace single tensors (an adapter's
    ``modules_to_save``) and ``deltas`` are added on top (LoRA ``B·A``, dense task vectors).
    """

    label: str
    weights: Mapping[str, Tensor] | None = None
    deltas: Mapping[str, Delta] = field(default_factory=dict)
    overrides: Mapping[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] | None = None


@dataclass
class MergeJob:
    """Everything :func:`execute` needs; built by :mod:`splice.merge.recipe` or by hand."""

    method: MergeMethod
    models: list[Source]
    resolve: Resolver
    base: Source | None = None
    transforms: list[tuple[MergeTransform, HyperParams]] = field(default_factory=list)
    seed: int = 0
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: merged (with its resolved parameters) or copied from the base."""

    name: str
    merge: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    layer: int | None = None
    num_layers: int | None = None
    params: HyperParams | None = None
    model_params: list[HyperParams] | None = None

    def context(self, seed: int, stats: Mapping[str, Any]) -> MergeContext:
        return MergeContext(
            self.name,
            seed=seed,
            layer=self.layer,
            num_layers=self.num_layers,
            stats=stats,
            params=self.params,
            model_params=self.model_params,
        )


_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_indices(names: list[str]) -> dict[str, tuple[int, int]]:
    """``name -> (block index, blocks in its stack)`` for names inside a layer stack.

    The block index is the first numeric path component (``model.layers.3.mlp…`` → 3); the
    text before it names the stack, and each stack (e.g. T5's encoder and decoder) is
    counted separately [lib, merging.md §6.7].
    """
    found: dict[str, tuple[str, int]] = {}
    for name in names:
        m = _INDEX.search(name)
        if m:
            found[name] = (name[: m.start()], int(m[1]))
    sizes: dict[str, int] = {}
    for prefix, i in found.values():
        sizes[prefix] = max(sizes.get(prefix, 0), i + 1)
    return {name: (i, sizes[prefix]) for name, (prefix, i) in found.items()}


def _shape_dtype(mapping: Mapping[str, Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    info = getattr(mapping, "info", None)
    if info is not None:
        i = info(name)
        return tuple(i.shape), i.dtype
    t = mapping[name]
    return tuple(t.shape), t.dtype


def _check_configs(sources: list[Source]) -> None:
    keys = ("model_type", "architectures", "num_hidden_layers", "hidden_size")
    first = next((s for s in sources if s.config), None)
    if first is None:
        return
    for s in sources:
        if not s.config or s is first:
            continue
        for key in keys:
            a, b = first.config.get(key), s.config.get(key)
            if a is not None and b is not None and a != b:
                raise SpliceError(
                    f"incompatible architectures: {key} is {b!r} here but {a!r} in {first.label}",
                    where=s.label,
                    fix="merge models of one architecture and size (fine-tunes of one base)",
                )


def _same_names(odd: list[str], what: str, src: Source) -> None:
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise SpliceError(
            f"tensor {odd[0]!r} {what}{more}",
            where=src.label,
            fix="merge checkpoints of one architecture",
        )


def plan(job: MergeJob) -> list[TensorTask]:
    """Check the job from headers alone and list the output tensors in base order.

    Raises:
        SpliceError: missing or extra tensors, shape or dtype mismatch, incompatible configs,
            an adapter without a base, a wrong number of inputs, invalid parameters.
    """
    method = job.method
    lo, hi = method.num_models
    if not lo <= len(job.models) <= (hi if hi is not None else len(job.models)):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
        raise SpliceError(
            f"{method.name} merges {want} model(s) besides the base, got {len(job.models)}",
            fix="fix the models list of the recipe",
        )
    if method.requires_base and job.base is None:
        raise SpliceError(
            f"{method.name} needs a base model",
            fix="add `base:` (mergekit: `base_model:`) with the pretrained checkpoint",
        )
    ref = job.base or job.models[0]
    if ref.weights is None:
        raise SpliceError(
            "adapter or delta inputs need a base model",
            where=ref.label,
            fix="add `base:` with the checkpoint the adapter was trained on",
        )
    for src in job.models:
        if src.weights is None and job.base is None:
            raise SpliceError(
                "adapter or delta input without a base model",
                where=src.label,
                fix="add `base:` with the checkpoint the adapter was trained on",
            )
    _check_configs([s for s in (job.base, *job.models) if s is not None])
    names = list(ref.weights)
    name_set = set(names)
    for src in job.models:
        if src is ref:
            continue
        if src.weights is not None:
            _same_names(
                [n for n in src.weights if n not in name_set], f"is not in {ref.label}", src
            )
            _same_names(
                [n for n in names if n not in src.weights], f"of {ref.label} is missing", src
            )
        for n in (*src.deltas, *src.overrides):
            if n not in name_set:
                raise SpliceError(
                    f"adapter targets {n!r}, which is not in the base {ref.label}",
                    where=src.label,
                    fix="use the base model the adapter was trained on",
                )
    layers = layer_indices(names)
    tasks = []
    for name in names:
        shape, dtype = _shape_dtype(ref.weights, name)
        mergeable = dtype.is_floating_point
        for src in job.models:
            if src is ref:
                continue
            got = []
            if src.weights is not None:
                got.append(_shape_dtype(src.weights, name))
            if name in src.overrides:
                got.append(_shape_dtype(src.overrides, name))
            if name in src.deltas:
                got.append((tuple(src.deltas[name].shape), dtype))
            for s, d in got:
                if s != shape:
                    raise SpliceError(
                        f"shape {s} differs from {shape} in {ref.label}",
                        where=f"{src.label}: {name}",
                        fix="merge checkpoints of one architecture and size",
                    )
                if d.is_floating_point != mergeable:
                    raise SpliceError(
                        f"dtype {d} here but {dtype} in {ref.label}",
                        where=f"{src.label}: {name}",
                        fix="float weights cannot be merged with integer buffers",
                    )
        nbytes = math.prod(shape) * dtype.itemsize
        if not mergeable:
            tasks.append(TensorTask(name, False, shape, dtype, nbytes))
            continue
        layer, num_layers = layers.get(name, (None, None))
        ctx = MergeContext(name, layer=layer, num_layers=num_layers)
        params, model_params = job.resolve(name, ctx.depth)
        tasks.append(
            TensorTask(name, True, shape, dtype, nbytes, layer, num_layers, params, model_params)
        )
    return tasks


class _Reader:
    """Reads one name from every input in the compute dtype, on the compute device."""

    def __init__(self, job: MergeJob) -> None:
        self.job = job
        self.device = torch.device(job.device)
        self.check_finite = True

    def dtype_for(self, task: TensorTask) -> torch.dtype:
        if self.job.dtype is not None:
            return self.job.dtype
        return torch.float64 if task.dtype == torch.float64 else torch.float32

    def _fetch(self, mapping: Mapping[str, Tensor], name: str, dt: torch.dtype) -> Tensor:
        raw = mapping[name]
        t = raw.to(self.device, dt)
        # A lazy checkpoint returns fresh buffers; a caller's dict must never be modified.
        if t is raw and not hasattr(mapping, "info"):
            t = t.clone()
        return t

    def _finite(self, t: Tensor, label: str, name: str) -> Tensor:
        # Any NaN/Inf makes the sum non-finite; a finite input's sum may overflow, so only
        # then is the exact (slower) check needed.
        if (
            self.check_finite
            and not math.isfinite(float(t.sum()))
            and not bool(torch.isfinite(t).all())
        ):
            raise SpliceError(
                "NaN or Inf in input tensor",
                where=f"{label}: {name}",
                fix="the checkpoint is corrupt or diverged; repair or drop this input",
            )
        return t

    def read(self, task: TensorTask) -> tuple[Tensor | None, list[Tensor]]:
        job, name, dt = self.job, task.name, self.dtype_for(task)
        base = None
        if job.base is not None:
            assert job.base.weights is not None
            base = self._finite(self._fetch(job.base.weights, name, dt), job.base.label, name)
        tensors = []
        for src in job.models:
            if name in src.overrides:
                t = self._fetch(src.overrides, name, dt)
            elif src.weights is not None:
                t = self._fetch(src.weights, name, dt)
            else:
                assert base is not None
                t = base.clone()
            delta = src.deltas.get(name)
            if delta is not None:
                t += delta.materialize(dt).to(self.device)
            tensors.append(self._finite(t, src.label, name))
        return base, tensors

    def stream(
        self, tasks: list[TensorTask]
    ) -> Iterator[tuple[TensorTask, Tensor | None, list[Tensor]]]:
        """Read tasks in order, the next one in a background thread while this one is used."""
        if not tasks:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="splice-read") as pool:
            future = pool.submit(self.read, tasks[0])
            for i, task in enumerate(tasks):
                base, tensors = future.result()
                if i + 1 < len(tasks):
                    future = pool.submit(self.read, tasks[i + 1])
                yield task, base, tensors
                del base, tensors


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    @contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        ) as p:
            task = p.add_task(description, total=total)
            yield lambda n: p.advance(task, n)


def execute(
    job: MergeJob, tasks: list[TensorTask], sink: Sink, *, progress: bool = False
) -> dict[str, Any]:
    """Run the statistics passes, then merge every task into ``sink``; return the stats.

    Raises:
        SpliceError: NaN/Inf in an input, or a method's own check fails.
    """
    if job.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpliceError("--device cuda but no CUDA device is available", fix="use --device cpu")
    _return_freed_memory()
    # The work is memory-bound and chunked to stay in cache; one thread avoids intra-op
    # barriers that stall badly on a busy machine.
    with one_thread():
        return _execute(job, tasks, sink, progress)


@functools.cache
def _return_freed_memory() -> None:
    """On glibc, serve allocations ≥ 1 MB by mmap so a freed input returns to the OS at once.

    glibc otherwise raises its mmap threshold after the first large free and keeps freed
    tensors of up to 32 MB in the heap, so peak RSS drifts far above the live working set.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return


def _execute(job: MergeJob, tasks: list[TensorTask], sink: Sink, progress: bool) -> dict[str, Any]:
    reader = _Reader(job)
    bars = _Progress(progress)
    merge_tasks = [t for t in tasks if t.merge]
    total = sum(t.nbytes for t in merge_tasks)
    stats: dict[str, Any] = {}
    params0, model_params0 = job.resolve(None, 0.0)
    method = job.method

    def passes(stat: Any, label: str, observe: Callable[..., None]) -> None:
        done, n = False, 0
        while not done:
            n += 1
            with bars.bar(f"{label} pass {n}", total) as advance:
                for task, base, tensors in reader.stream(merge_tasks):
                    observe(task, base, tensors)
                    advance(task.nbytes)
                    del base, tensors
            reader.check_finite = False
            done = stat.end_pass()
        if stat.key in stats:
            raise RuntimeError(f"two statistics share the key {stat.key!r}")
        stats[stat.key] = stat.result()

    for stat in method.global_stats(params0, model_params0):

        def observe(task: TensorTask, base: Tensor | None, tensors: list[Tensor]) -> None:
            stat.observe(task.name, base, tensors, task.context(job.seed, stats))  # noqa: B023

        passes(stat, stat.key, observe)

    for transform, tparams in job.transforms:
        for tstat in transform.global_stats(tparams, len(job.models)):

            def observe_merged(task: TensorTask, base: Tensor | None, tensors: list[Tensor]):
                ctx = task.context(job.seed, stats)
                merged = _merge_one(job, task, base, tensors, ctx, upto=transform)  # noqa: B023
                tstat.observe(task.name, base, tensors, merged, ctx)  # noqa: B023

            passes(tstat, tstat.key, observe_merged)

    ref = job.base or job.models[0]
    assert ref.weights is not None
    inputs = reader.stream(merge_tasks)
    with bars.bar("merge", total) as advance:
        for task in tasks:
            if not task.merge:
                sink.write(task.name, ref.weights[task.name])
                continue
            _, base, tensors = next(inputs)
            ctx = task.context(job.seed, stats)
            merged = _merge_one(job, task, base, tensors, ctx)
            if tuple(merged.shape) != task.shape:
                raise RuntimeError(f"{method.name} returned shape {tuple(merged.shape)}")
            out_dtype = job.out_dtype or task.dtype
            sink.write(task.name, merged.to("cpu", out_dtype))
            del base, tensors, merged
            advance(task.nbytes)
    inputs.close()
    return stats


def _merge_one(
    job: MergeJob,
    task: TensorTask,
    base: Tensor | None,
    tensors: list[Tensor],
    ctx: MergeContext,
    upto: MergeTransform | None = None,
) -> Tensor:
    """The method's result for one name, then the transforms before ``upto``, in order."""
    assert task.params is not None and task.model_params is not None
    inputs = [t.clone() for t in tensors] if job.transforms else tensors
    merged = job.method.merge(base, inputs, task.params, task.model_params, ctx)
    for transform, tparams in job.transforms:
        if transform is upto:
            break
        merged = transform.apply(base, merged, tensors, tparams, ctx)
    return merged
