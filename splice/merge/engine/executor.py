"""The streaming merge executor: one tensor name at a time, through every input.

:func:`execute` streams the statistics passes the method (and its transforms) ask for, and
the merge pass: for each name of the base it reads that tensor from every input — full
checkpoints, or the base plus one materialized adapter delta — calls the method, and hands
the result to a sink (the atomic sharded writer, or a dict). Peak memory is the inputs of one
name plus chunk-sized scratch; it does not grow with the number of tensors. Integer/bool
buffers are copied from the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from splice._lazy import lazy_import
from splice._memory import return_freed_memory
from splice.errors import SpliceError
from splice.io import to_torch
from splice.io._pool import pooled_reads
from splice.merge.base import MergeContext, MergeTransform
from splice.merge.engine.job import MergeJob, Sink, TensorTask
from splice.merge.engine.stats import one_thread

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["COPIED_DIFFER", "Observer", "execute"]


def _read(job: MergeJob, mapping: Mapping[str, Tensor], name: str) -> Tensor:
    """``mapping[name]``, shown to ``job.on_read``."""
    raw = mapping[name]
    if job.on_read is not None and hasattr(mapping, "info"):
        job.on_read(mapping.info(name), raw)
    return raw


class _Reader:
    """Reads one name from every input in the compute dtype, on the compute device."""

    def __init__(self, job: MergeJob) -> None:
        self.job = job
        self.device = torch.device(job.device)
        self.check_finite = True

    def dtype_for(self, task: TensorTask) -> torch.dtype:
        if self.job.dtype is not None:
            return to_torch(self.job.dtype)
        return torch.float64 if task.dtype == torch.float64 else torch.float32

    def _fetch(self, mapping: Mapping[str, Tensor], name: str, dt: torch.dtype) -> Tensor:
        raw = _read(self.job, mapping, name)
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
            raw = self._fetch(job.base.weights, task.base_read or name, dt)
            base = self._finite(raw, job.base.label, name)
        tensors = []
        for i, src in enumerate(job.models):
            read = name if task.reads is None else task.reads[i]
            if name in src.overrides:
                t = self._fetch(src.overrides, name, dt)
            elif src.weights is not None and read is not None:
                t = self._fetch(src.weights, read, dt)
            else:  # an adapter on the base, or a tensor this model lacks (allow_missing)
                assert base is not None
                t = base.clone()
            delta = src.deltas.get(name)
            if delta is not None:
                t += delta.materialize(dt).to(self.device)
            tensors.append(self._finite(t, src.label, name))
        if task.vocab and job.tokens is not None:
            base, tensors = job.tokens.apply(base, tensors)
        elif task.vocab:
            from splice.merge.engine.vocab import fit_rows

            base, tensors = fit_rows(base, tensors, task.shape[0])
        return base, tensors

    def stream(
        self, tasks: list[TensorTask]
    ) -> Iterator[tuple[TensorTask, Tensor | None, list[Tensor]]]:
        """Read tasks in order; where :func:`~.memory.read_ahead_schedule` allows, the next
        one in a background thread while this one is used."""
        from splice.merge.engine.memory import read_ahead_schedule

        ahead = read_ahead_schedule(self.job, tasks)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="splice-read") as pool:
            future = None
            for i, task in enumerate(tasks):
                held = [self.read(task) if future is None else future.result()]
                future = pool.submit(self.read, tasks[i + 1]) if ahead[i] else None
                # hand the tensors over without keeping a reference here: the caller frees
                # them when it is done, not when it next asks (copied tensors come between)
                yield (task, *held.pop())


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


Observer = Callable[[TensorTask, "Tensor | None", "Tensor"], None]
"""``(task, base or None, output tensor)``, called on every tensor before it is written."""


def execute(
    job: MergeJob,
    tasks: list[TensorTask],
    sink: Sink,
    *,
    progress: bool = False,
    on_output: Observer | None = None,
) -> dict[str, Any]:
    """Run the statistics passes, then merge every task into ``sink``; return the stats.

    ``on_output`` sees every output tensor before it is written (the fidelity check).

    Raises:
        SpliceError: NaN/Inf in an input, an integer buffer that differs between inputs
            (unless ``allow_missing``), or a method's own check fails.
    """
    if job.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpliceError("--device cuda but no CUDA device is available", fix="use --device cpu")
    return_freed_memory()
    # The work is memory-bound and chunked to stay in cache; one thread avoids intra-op
    # barriers that stall badly on a busy machine.
    from splice.merge.engine.memory import pool_budget

    with one_thread(), pooled_reads(pool_budget(job, tasks)):
        return _execute(job, tasks, sink, progress, on_output)


def _execute(
    job: MergeJob, tasks: list[TensorTask], sink: Sink, progress: bool, on_output: Observer | None
) -> dict[str, Any]:
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

    inputs = reader.stream(merge_tasks)
    with bars.bar("merge", total) as advance:
        for task in tasks:
            if not task.merge:
                copied = _copy(job, task, stats)
                if on_output is not None:
                    on_output(task, None, copied)
                sink.write(task.name, copied)
                continue
            _, base, tensors = next(inputs)
            ctx = task.context(job.seed, stats)
            merged = _merge_one(job, task, base, tensors, ctx)
            if tuple(merged.shape) != task.shape:
                raise RuntimeError(f"{method.name} returned shape {tuple(merged.shape)}")
            final = merged.to(to_torch(job.out_dtype or task.dtype_name))
            if on_output is not None:
                on_output(task, base, final)
            sink.write(task.name, final.to("cpu"))
            del base, tensors, merged, final
            advance(task.nbytes)
    inputs.close()
    return stats


COPIED_DIFFER = "engine.copied_differ"
"""Key of the stats entry ``{name: [labels]}``: integer buffers that differ from the copied
input's (only with ``allow_missing``; an error otherwise)."""


def _copy(job: MergeJob, task: TensorTask, stats: dict[str, Any]) -> Tensor:
    """A copied tensor, checked equal in every input that stores it (integer buffers)."""
    sources = job.sources()
    src = sources[task.copy_from]
    assert src.weights is not None
    value = _read(job, src.weights, task.name)
    if task.dtype.is_floating_point:  # a float tensor some inputs lack (allow_missing)
        return value
    for other in sources:
        if other is src or other.weights is None or task.name not in other.weights:
            continue
        theirs = _read(job, other.weights, task.name)
        if theirs.dtype == value.dtype and torch.equal(theirs, value):
            continue
        if job.allow_missing:
            stats.setdefault(COPIED_DIFFER, {}).setdefault(task.name, []).append(other.label)
        else:
            raise SpliceError(
                f"integer tensor differs from {src.label}'s; no method merges integer buffers",
                where=f"{other.label}: {task.name}",
                fix="check that the inputs are fine-tunes of one model, or pass --allow-missing "
                f"to copy {src.label}'s (the ledger records it)",
            )
    return value


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
