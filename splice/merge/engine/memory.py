"""The memory plan: peak RAM (and VRAM), output size, shards, passes and time, from headers.

The engine holds, for the tensor name being merged, every input of that name in the compute
dtype (``R``), the method's scratch (``S``: a multiple of one such tensor, declared by the
method)
and the output cast (``O``, when ``out_dtype`` differs). Reading converts dtypes or
materializes ``B·A`` one input at a time (``X``: transient). A converted input's read buffer
goes back to the buffer pool (:mod:`splice.io._pool`), which keeps the last one until its next
allocation: on the CPU that buffer counts in ``S``. Reading the next name ahead
(``R'``) overlaps I/O with compute, but only where ``R + S + O + R' + X'`` stays within the
largest single name's working set: so the peak is ``max(R + max(X, S + O))`` over names,
whatever the timing, and the plan can state it exactly (``--max-memory`` is checked against
it before anything is read). Statistics passes hold ``R`` and their own scratch (no output
cast). The first merge in a process also pages in library code once
(:data:`FIRST_USE_BYTES`, part of the total, not of the working set).

Scratch multiples were measured with ``VmHWM`` on fixtures (tests/merge/engine/test_memory.py keeps
the working set within 20 %). Each method declares its own in its file: the merge pass's
(:meth:`~splice.merge.base.MergeMethod.scratch_tensors`, plus
:meth:`~splice.merge.base.MergeMethod.gpu_scratch_tensors` on a GPU), its statistics passes'
(:meth:`~splice.merge.base.MergeMethod.stat_scratch_tensors`,
:meth:`~splice.merge.base.MergeMethod.stat_passes`) and its speed
(:attr:`~splice.merge.base.MergeMethod.throughput`); a method that declares nothing gets
conservative defaults.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError
from splice.io import dtype_name, human_bytes, itemsize, parse_size
from splice.merge.engine.job import stored_shape_dtype

if TYPE_CHECKING:
    from splice.merge.engine.job import MergeJob, Source, TensorTask

__all__ = ["MemoryPlan", "check_budget", "estimate", "pool_budget", "read_ahead_schedule"]

FIXED_BYTES = 8 << 20
"""Chunk scratch, histograms, the input checksum hasher's 1 MB buffer, the writer's three 1 MB
staging buffers (:mod:`splice.io._direct`) and allocator slack."""
DEVICE_FIXED_BYTES = 12 << 20
"""The same on a GPU, in VRAM: chunk scratch, histograms and the caching allocator's rounding
(measured on an H200: the clip-statistics merge on 256×256 tensors used 3.4 MiB above its
working set plus ``FIXED_BYTES``). The CUDA context and the cuBLAS/cuSOLVER handles'
workspaces, created once per process, are not counted."""
FIRST_USE_BYTES = 48 << 20
"""What the first merge in a process adds once, on top of its working set: library code
paged in for the kernels it uses and modules imported on first use (measured 5–32 MB, most
for methods that use ``torch.linalg``; tests/merge/engine/test_memory.py keeps it under this)."""

TORCH_IMPORT_BYTES = 200 << 20
"""What ``import torch`` (numpy included) adds to resident memory: measured 195–202 MiB for
torch 2.13 on CPU, after splice's modules or only the CLI's libraries (CUDA builds not
measured). :func:`merge_process_rss` adds it to a plan made before torch is imported;
tests/merge/engine/test_preflight.py keeps it within 0–15 % above what the torch in use adds."""

_WORDS = {"float64": 4, "float32": 2, "float16": 1, "bfloat16": 1}
_CLASSES = ((10, "seconds"), (60, "under a minute"), (600, "minutes"), (3600, "under an hour"))


@dataclass
class MemoryPlan:
    """What a merge will need, before it runs (all sizes in bytes)."""

    peak_ram: int
    """Working set above the process's own footprint (the imported libraries)."""
    baseline_ram: int
    """The merging process's resident memory before it merges: Python, torch and splice
    imported (:func:`merge_process_rss`)."""
    output_bytes: int
    shards: int
    passes: int
    read_bytes: int
    seconds: float
    time_class: str
    largest: str
    """The tensor name whose working set is the peak."""
    device: str = "cpu"
    peak_vram: int | None = None
    """With a CUDA device: tensors on the GPU (the CUDA context, ~0.5 GB, comes on top)."""
    read_ahead: str = ""
    notes: list[str] = field(default_factory=list)
    first_use_ram: int = FIRST_USE_BYTES
    """Added once by the first merge in a process (:data:`FIRST_USE_BYTES`)."""

    @property
    def total_ram(self) -> int:
        return self.baseline_ram + self.first_use_ram + self.peak_ram

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_ram": self.total_ram}

    def lines(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows for the CLI."""
        rows = [
            (
                "peak RAM",
                f"{human_bytes(self.total_ram)} ({human_bytes(self.baseline_ram)} process + "
                f"{human_bytes(self.first_use_ram)} first use + "
                f"{human_bytes(self.peak_ram)} working set, at {self.largest})",
            )
        ]
        if self.peak_vram is not None:
            rows.append(("peak VRAM", f"{human_bytes(self.peak_vram)} + CUDA context"))
        rows += [
            ("output", f"{human_bytes(self.output_bytes)} in {self.shards} shard(s)"),
            ("passes", f"{self.passes} over {human_bytes(self.read_bytes)} of inputs"),
            ("time", f"{self.time_class} (≈ {self.seconds:.0f} s on one CPU core)"),
        ]
        if self.read_ahead:
            rows.append(("read-ahead", self.read_ahead))
        return rows


def process_rss() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def merge_process_rss() -> int:
    """What a merging process holds before its working set: this process's resident memory,
    plus :data:`TORCH_IMPORT_BYTES` when torch is not imported yet (a plan from headers
    alone, ``splice merge --plan``, never imports it; the merge will)."""
    rss = process_rss()
    return rss + TORCH_IMPORT_BYTES if rss and "torch" not in sys.modules else rss


def _compute_dtype(job: MergeJob, task: TensorTask) -> str:
    if job.dtype is not None:
        return dtype_name(job.dtype)
    return "float64" if task.dtype_name == "float64" else "float32"


def _stored(src: Source, name: str) -> tuple[int, str] | None:
    mapping = src.weights
    if mapping is None or name not in mapping:
        return None
    shape, dtype = stored_shape_dtype(mapping, name)
    return math.prod(shape), dtype


@dataclass(frozen=True)
class _Cost:
    read: int  # R: inputs of this name, resident while it is merged
    transient: int  # X: extra while reading the last input (dtype cast, B·A)
    work: int  # S + O: method scratch and output cast (merge pass) or the statistic's scratch
    pooled: int = 0  # of R: inputs that stay in their read buffers (reusable, splice.io._pool)

    @property
    def peak(self) -> int:
        """Reading ends before merging starts: ``R + max(X, S + O)``."""
        return self.read + max(self.transient, self.work)


def _costs(job: MergeJob, task: TensorTask, scratch: tuple[float, float]) -> _Cost:
    if not task.merge:
        return _Cost(task.nbytes, 0, 0, task.nbytes)
    dt = _compute_dtype(job, task)
    numel = math.prod(task.shape)
    c = numel * itemsize(dt)
    read = transient = pooled = stale = 0
    pairs: list[tuple[Source, str | None]] = []
    if job.base is not None:
        pairs.append((job.base, task.base_read or task.name))
    for i, src in enumerate(job.models):
        pairs.append((src, task.name if task.reads is None else task.reads[i]))
    for src, name in pairs:
        read += c
        stored = _stored(src, name) if name is not None and task.name not in src.overrides else None
        if stored is not None and stored[1] != dt:
            transient = max(transient, stored[0] * itemsize(stored[1]))
            if job.device == "cpu" and hasattr(src.weights, "info"):
                stale = transient  # the read buffer stays in splice.io._pool until its next get
        elif stored is not None and job.device == "cpu" and hasattr(src.weights, "info"):
            pooled += c
        if task.name in src.deltas:
            transient = max(transient, 2 * c)
    if task.vocab:  # rows fitted by concatenation; a token map re-indexes every input
        read += c * (len(pairs) if job.tokens is not None else 1)
        pooled = 0
    out_dtype = dtype_name(job.out_dtype or task.dtype_name)
    out = numel * itemsize(out_dtype)
    cast = out if out_dtype != dt else 0
    # a transform gets the inputs as read, so the method works on clones; LiNeS' rescale
    # θ₀ + λ·(θ − θ₀) holds two temporaries
    clones = (len(job.models) + 2) * c if job.transforms else 0
    merge, stats = scratch  # only the merge pass casts its output
    work = max(int(merge * c) + cast, int(stats * c)) + clones + stale
    return _Cost(read, transient, work, pooled)


def _scratch(job: MergeJob) -> tuple[float, float]:
    """Per-name scratch of the merge pass, and the largest over the statistics passes."""
    t, method = len(job.models), job.method
    params0, model_params0 = job.resolve(None, 0.0)
    scratch = method.scratch_for(t, params0)
    if job.device.startswith("cuda"):
        scratch += method.gpu_scratch_tensors(t)
    worst = 0.0
    for stat in method.global_stats(params0, model_params0):
        worst = max(worst, method.stat_scratch_tensors(stat.key, t, params0))
    return scratch, worst


def _passes(job: MergeJob, tasks: list[TensorTask]) -> int:
    words = max((_WORDS.get(_compute_dtype(job, t), 2) for t in tasks if t.merge), default=2)
    params0, model_params0 = job.resolve(None, 0.0)
    passes = 1 + sum(
        job.method.stat_passes(s.key, words)
        for s in job.method.global_stats(params0, model_params0)
    )
    for transform, tparams in job.transforms:
        passes += len(transform.global_stats(tparams, len(job.models)))
    return passes


def read_ahead_schedule(job: MergeJob, tasks: list[TensorTask]) -> list[bool]:
    """For each merged task, whether the next one may be read while it is merged.

    Only where that keeps within the largest single task's working set, so read-ahead never
    raises the peak (and the plan's peak holds whatever the timing).
    """
    if not job.read_ahead:
        return [False] * len(tasks)
    scratch = _scratch(job)
    return _ahead([_costs(job, t, scratch) for t in tasks])


def _ahead(costs: list[_Cost]) -> list[bool]:
    """:func:`read_ahead_schedule` from the merged tasks' costs."""
    peak = max((c.peak for c in costs), default=0)
    return [
        i + 1 < len(costs) and c.read + c.work + costs[i + 1].read + costs[i + 1].transient <= peak
        for i, c in enumerate(costs)
    ]


def pool_budget(job: MergeJob, tasks: list[TensorTask]) -> int:
    """Bytes the read-buffer pool (:mod:`splice.io._pool`) may keep: the plan's peak minus the
    most that memory outside the pool holds at once (a name's working set less its inputs that
    stay in read buffers; with read-ahead, this name's and the next one's), so pooled buffers
    never lift the peak."""
    scratch = _scratch(job)
    costs = [_costs(job, t, scratch) for t in tasks]
    if not costs:
        return 0
    outside = [c.peak - c.pooled for c in costs]
    merged = [c for t, c in zip(tasks, costs, strict=True) if t.merge]
    schedule = _ahead(merged) if job.read_ahead else []
    for i, ahead in enumerate(schedule):
        if ahead:
            c, d = merged[i], merged[i + 1]
            outside.append(c.read - c.pooled + c.work + d.read - d.pooled + d.transient)
    return max(0, max(c.peak for c in costs) - max(outside))


def _shards(tasks: list[TensorTask], sizes: list[int], max_shard: int) -> int:
    shards, size = 1, 0
    for n in sizes:
        if size and size + n > max_shard:
            shards, size = shards + 1, 0
        size += n
    return shards if tasks else 0


def estimate(
    job: MergeJob,
    tasks: list[TensorTask],
    *,
    max_shard_size: int | str = "5GB",
    output_bytes: int | None = None,
) -> MemoryPlan:
    """The memory and time plan of ``job`` (see the module docstring); reads no tensor.

    ``output_bytes`` overrides the written size (an adapter output is not the model's size).
    """
    scratch = _scratch(job)
    merged = [t for t in tasks if t.merge]
    costs = {t.name: _costs(job, t, scratch) for t in tasks}
    peak_name, peak = "", 0
    for t in tasks:
        c = costs[t.name]
        if c.peak > peak:
            peak_name, peak = t.name, c.peak
    out_sizes = [
        math.prod(t.shape) * itemsize((job.out_dtype or t.dtype_name) if t.merge else t.dtype_name)
        for t in tasks
    ]
    passes = _passes(job, tasks)
    one_pass = sum(costs[t.name].read for t in merged)
    copied = sum(costs[t.name].read for t in tasks if not t.merge)
    read_bytes = one_pass * passes + copied
    speed = job.method.throughput
    seconds = read_bytes / speed
    klass = next((label for limit, label in _CLASSES if seconds < limit), "hours")
    schedule = read_ahead_schedule(job, merged)
    ahead = sum(schedule)
    on_gpu = job.device.startswith("cuda")
    largest_raw = max((c.read // max(1, len(job.sources())) for c in costs.values()), default=0)
    return MemoryPlan(
        peak_ram=(2 * largest_raw if on_gpu else peak) + FIXED_BYTES,
        baseline_ram=merge_process_rss(),
        output_bytes=output_bytes if output_bytes is not None else sum(out_sizes),
        shards=_shards(tasks, out_sizes, parse_size(max_shard_size)),
        passes=passes,
        read_bytes=read_bytes,
        seconds=seconds,
        time_class=klass,
        largest=peak_name,
        device=job.device,
        peak_vram=peak + DEVICE_FIXED_BYTES if on_gpu else None,
        read_ahead=f"{ahead} of {len(merged)} tensors read while the previous one merges"
        if job.read_ahead
        else "off",
    )


def check_budget(plan: Mapping[str, Any], max_memory: int | str | None) -> None:
    """Refuse a plan (:meth:`MemoryPlan.to_json`) whose total RAM is above ``max_memory``."""
    if max_memory is None:
        return
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
