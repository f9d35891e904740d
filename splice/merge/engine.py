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
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from splice.deltas import Delta
from splice.errors import SpliceError
from splice.io._pool import pooled_reads
from splice.merge.arch import Architecture, infer_architecture, tie_pairs
from splice.merge.base import HyperParams, MergeContext, MergeMethod, MergeTransform
from splice.merge.stats import one_thread

__all__ = [
    "Checked",
    "Dropped",
    "MergeJob",
    "Resolver",
    "Sink",
    "Source",
    "TensorTask",
    "check",
    "execute",
    "layer_indices",
    "plan",
]

VocabPolicy = Literal["base", "union", "intersect"]
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
    raw: Mapping[str, list[str]] | None = None
    """For adapters and delta files: base tensor name -> the names stored in the file."""
    checkpoints: list[Any] = field(default_factory=list)
    """The opened files behind this input (hashed for the ledger, checked unchanged)."""


@dataclass
class MergeJob:
    """Everything :func:`execute` needs; built by :mod:`splice.merge.recipe` or by hand.

    ``allow_missing``: a tensor some inputs lack is merged with the base's value in their place
    (a zero task vector; copied from the reference without a base), one only some inputs have
    is dropped; both are errors otherwise. ``vocab``: how embedding/head rows that differ
    between inputs are reconciled (:mod:`splice.merge.vocab`). ``read_ahead``: read the next
    tensor while this one is merged (faster; one more set of inputs in memory).
    """

    method: MergeMethod
    models: list[Source]
    resolve: Resolver
    base: Source | None = None
    transforms: list[tuple[MergeTransform, HyperParams]] = field(default_factory=list)
    seed: int = 0
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    device: str = "cpu"
    allow_missing: bool = False
    vocab: VocabPolicy | None = None
    read_ahead: bool = True
    on_read: Callable[[Any, Tensor], None] | None = None
    """Called with ``(TensorInfo, raw tensor)`` for every tensor read from a checkpoint file
    (the ledger's hasher follows the reads through the page cache; it never blocks)."""

    def sources(self) -> list[Source]:
        """The base (if any), then the models: what :attr:`TensorTask.copy_from` indexes."""
        return [s for s in (self.base, *self.models) if s is not None]

    def check_unchanged(self) -> None:
        """Refuse to publish if any input checkpoint changed on disk since it was opened."""
        for src in self.sources():
            for ckpt in src.checkpoints:
                ckpt.check_unchanged()


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: merged (with its resolved parameters) or copied from one input."""

    name: str
    merge: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    layer: int | None = None
    num_layers: int | None = None
    params: HyperParams | None = None
    model_params: list[HyperParams] | None = None
    block: str = "other"
    reads: tuple[str | None, ...] | None = None
    """Per model, the name read for this task: a tied head reads its embedding, None means
    the model lacks it (``allow_missing``: the base's value is used). None: ``name``."""
    base_read: str | None = None
    """The name read from the base, when it differs from ``name`` (a tied head)."""
    copy_from: int = 0
    """For a copied task, the index into :meth:`MergeJob.sources` it is copied from."""
    vocab: bool = False
    """Rows differ between inputs: each is fitted to ``shape[0]`` rows when read."""

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


@dataclass(frozen=True)
class Dropped:
    """An input tensor that is not in the output, and why (recorded in the ledger)."""

    source: str
    name: str
    reason: str


@dataclass
class Checked:
    """What :func:`check` found: the output tensors, and everything the ledger must tell."""

    tasks: list[TensorTask]
    arch: Architecture
    dropped: list[Dropped] = field(default_factory=list)
    vocab: dict[str, Any] | None = None
    """Vocab report (:func:`splice.merge.vocab.report`) when rows differ between inputs."""
    untied: list[str] = field(default_factory=list)
    """Heads the reference ties to its embedding but the output stores (another input
    has its own head)."""
    notes: dict[str, list[str]] = field(default_factory=dict)
    """Per output tensor, how inputs were read when not plainly (tied, missing)."""

    def note(self, name: str, text: str) -> None:
        self.notes.setdefault(name, []).append(text)


_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_indices(names: list[str]) -> dict[str, tuple[int, int]]:
    """``name -> (block index, blocks in its stack)`` for names inside a layer stack.

    The block index is the first numeric path component (``model.layers.3.mlp…`` → 3); the
    text before it names the stack, and each stack (e.g. T5's encoder and decoder) is
    counted separately [lib, merging.md §6.7]. :func:`splice.merge.arch.infer_architecture`
    refines this with known stack names and the config.
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
    for s in sources:
        if s.config and s.config.get("quantization_config"):
            method = (s.config["quantization_config"] or {}).get("quant_method", "quantized")
            raise SpliceError(
                f"the checkpoint is {method}-quantized; its integer weights cannot be merged",
                where=s.label,
                fix="merge the fp16/bf16/fp32 checkpoints, then quantize the result",
            )
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


def _odd_names(odd: list[str], what: str, src: Source, fix: str) -> None:
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise SpliceError(f"tensor {odd[0]!r} {what}{more}", where=src.label, fix=fix)


_MISSING_FIX = (
    "merge checkpoints of one architecture, or pass --allow-missing (allow_missing=True) "
    "to merge what the inputs share (the ledger records what was dropped)"
)


def plan(job: MergeJob) -> list[TensorTask]:
    """Check the job from headers alone and list the output tensors in base order.

    Raises:
        SpliceError: see :func:`check`.
    """
    return check(job).tasks


def check(job: MergeJob) -> Checked:
    """Preflight: check the whole job from headers and configs before any tensor is read.

    Input counts, configs (architecture, size, quantization), layer counts against
    ``config.json``, tensor names (tied heads read their embedding; missing or extra names
    fail unless ``allow_missing``), shapes (embedding rows may differ under a ``vocab``
    policy), dtypes, and every tensor's resolved parameters.

    Raises:
        SpliceError: naming the input, the tensor and the fix.
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
    _check_configs(job.sources())
    need_layers = bool(job.transforms) or bool(getattr(job.resolve, "uses_depth", False))
    for src in job.sources():
        if src is not ref and src.weights is not None and src.config:
            infer_architecture(src.weights, src.config, where=src.label)
    arch = infer_architecture(ref.weights, ref.config, where=ref.label, need_layers=need_layers)
    return _Checker(job, ref, arch).run()


class _Checker:
    """The name, shape and parameter checks of :func:`check`, one reference at a time."""

    def __init__(self, job: MergeJob, ref: Source, arch: Architecture) -> None:
        self.job, self.ref, self.arch = job, ref, arch
        assert ref.weights is not None
        self.ref_weights = ref.weights
        self.out = Checked([], arch)
        self.names = list(ref.weights)
        self.base_alias: dict[str, str] = {}

    def run(self) -> Checked:
        self._tied_heads()
        reads = self._reads()
        self._adapters()
        tasks = self.out.tasks
        resized: dict[str, tuple[int, list[tuple[str, int]]]] = {}
        for name in self.names:
            task = self._task(name, reads, resized)
            if task is not None:
                tasks.append(task)
        if resized:
            from splice.merge.vocab import report

            self.out.vocab = report(self.job, resized)
        return self.out

    def _tied_heads(self) -> None:
        """A head the reference ties (absent) but another input stores joins the output."""
        for head, emb in tie_pairs(self.ref.config):
            if head in self.ref_weights or emb not in self.ref_weights:
                continue
            stored = [
                s.label for s in self.job.models if s.weights is not None and head in s.weights
            ]
            if stored:
                self.names.append(head)
                self.base_alias[head] = emb
                self.out.untied.append(head)
                self.out.note(
                    head,
                    f"{self.ref.label} ties it to {emb} (read in its place); "
                    f"stored by {', '.join(stored)}",
                )

    def _reads(self) -> list[dict[str, str | None]]:
        """Per model, ``name -> name read`` for every output name it does not store as is."""
        job, name_set = self.job, set(self.names)
        out: list[dict[str, str | None]] = []
        for src in job.models:
            alias: dict[str, str | None] = {}
            out.append(alias)
            if src is self.ref or src.weights is None:
                if src is self.ref:
                    alias.update(self.base_alias)
                continue
            extra = [n for n in src.weights if n not in name_set]
            if extra and not job.allow_missing:
                _odd_names(extra, f"is not in {self.ref.label}", src, _MISSING_FIX)
            for n in extra:
                self.out.dropped.append(
                    Dropped(src.label, n, f"not in {self.ref.label} (--allow-missing)")
                )
            tied = {h: e for h, e in tie_pairs(src.config) if e in src.weights}
            missing = []
            for n in self.names:
                if n in src.weights:
                    continue
                if n in tied:
                    alias[n] = tied[n]
                    self.out.note(n, f"{src.label} ties it to {tied[n]} (read in its place)")
                else:
                    missing.append(n)
                    alias[n] = None
            if missing and not job.allow_missing:
                _odd_names(missing, f"of {self.ref.label} is missing", src, _MISSING_FIX)
        return out

    def _adapters(self) -> None:
        name_set = set(self.names)
        for src in self.job.models:
            for n in (*src.deltas, *src.overrides):
                if n not in name_set:
                    raise SpliceError(
                        f"adapter targets {n!r}, which is not in the base {self.ref.label}",
                        where=src.label,
                        fix="use the base model the adapter was trained on",
                    )

    def _task(
        self,
        name: str,
        reads: list[dict[str, str | None]],
        resized: dict[str, tuple[int, list[tuple[str, int]]]],
    ) -> TensorTask | None:
        job, ref = self.job, self.ref
        base_read = self.base_alias.get(name)
        shape, dtype = _shape_dtype(self.ref_weights, base_read or name)
        mergeable = dtype.is_floating_point
        per_model: list[str | None] = []
        shapes: list[tuple[str, tuple[int, ...]]] = [(ref.label, shape)]
        for src, alias in zip(job.models, reads, strict=True):
            read = alias.get(name, name)
            per_model.append(read)
            if src is ref or read is None:
                continue
            got = []
            if src.weights is not None:
                got.append(_shape_dtype(src.weights, read))
            if name in src.overrides:
                got.append(_shape_dtype(src.overrides, name))
            if name in src.deltas:
                got.append((tuple(src.deltas[name].shape), dtype))
            for s, d in got:
                shapes.append((src.label, s))
                if d.is_floating_point != mergeable:
                    raise SpliceError(
                        f"dtype {d} here but {dtype} in {ref.label}",
                        where=f"{src.label}: {name}",
                        fix="float weights cannot be merged with integer buffers",
                    )
        vocab = any(s != shape for _, s in shapes)
        if vocab:
            shape = self._vocab_rows(name, shapes, resized)
        role = self.arch.role(base_read or name)
        nbytes = math.prod(shape) * dtype.itemsize
        missing = [m.label for m, r in zip(job.models, per_model, strict=True) if r is None]
        if missing and job.base is None:
            self.out.note(
                name,
                f"missing in {', '.join(missing)} (--allow-missing): copied from {ref.label}, "
                "not merged",
            )
            return TensorTask(name, False, shape, dtype, nbytes, block=role.block)
        if missing:
            self.out.note(
                name,
                f"missing in {', '.join(missing)} (--allow-missing): the base's value used "
                "in their place (a zero task vector)",
            )
        plain = all(r == name for r in per_model) and base_read is None
        reads_t = None if plain else tuple(per_model)
        if not mergeable:
            return TensorTask(name, False, shape, dtype, nbytes, block=role.block)
        ctx = MergeContext(name, layer=role.layer, num_layers=role.num_layers)
        params, model_params = job.resolve(name, ctx.depth)
        return TensorTask(
            name,
            True,
            shape,
            dtype,
            nbytes,
            role.layer,
            role.num_layers,
            params,
            model_params,
            block=role.block,
            reads=reads_t,
            base_read=base_read,
            vocab=vocab,
        )

    def _vocab_rows(
        self,
        name: str,
        shapes: list[tuple[str, tuple[int, ...]]],
        resized: dict[str, tuple[int, list[tuple[str, int]]]],
    ) -> tuple[int, ...]:
        ref_label, shape = shapes[0]
        for label, s in shapes[1:]:
            if len(s) != len(shape) or s[1:] != shape[1:] or not s:
                raise SpliceError(
                    f"shape {s} differs from {shape} in {ref_label}",
                    where=f"{label}: {name}",
                    fix="merge checkpoints of one architecture and size",
                )
        rows = [s[0] for _, s in shapes]
        policy = self.job.vocab
        if policy is None:
            label, s = next((lab, s) for lab, s in shapes if s != shape)
            raise SpliceError(
                f"{s[0]} rows here but {shape[0]} in {ref_label} (vocab sizes differ)",
                where=f"{label}: {name}",
                fix="add `vocab: base`, `vocab: union` or `vocab: intersect` to the recipe "
                "(rows are matched by index: see docs/merging.md, Vocab policies)",
            )
        if self.arch.role(name).block not in ("embed", "head") and not _is_vocab_size(
            self.job, rows
        ):
            raise SpliceError(
                f"rows differ ({sorted(set(rows))}) in a tensor that is not an embedding or head",
                where=name,
                fix="merge checkpoints of one architecture and size",
            )
        if any(name in s.deltas or name in s.overrides for s in self.job.models):
            raise SpliceError(
                "an adapter changes a tensor whose rows differ between inputs",
                where=name,
                fix="merge the adapter into its base first, or use inputs of one vocab size",
            )
        out_rows = {"base": rows[0], "union": max(rows), "intersect": min(rows)}[policy]
        resized[name] = (out_rows, [(label, s[0]) for label, s in shapes])
        return (out_rows, *shape[1:])


def _is_vocab_size(job: MergeJob, rows: list[int]) -> bool:
    sizes = {s.config.get("vocab_size") for s in job.sources() if s.config}
    return bool(sizes & set(rows))


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
            return self.job.dtype
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
        if task.vocab:
            from splice.merge.vocab import fit_rows

            base, tensors = fit_rows(base, tensors, task.shape[0])
        return base, tensors

    def stream(
        self, tasks: list[TensorTask]
    ) -> Iterator[tuple[TensorTask, Tensor | None, list[Tensor]]]:
        """Read tasks in order; where :func:`~splice.merge.memory.read_ahead_schedule` allows,
        the next one in a background thread while this one is used."""
        from splice.merge.memory import read_ahead_schedule

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


Observer = Callable[[TensorTask, Tensor | None, Tensor], None]
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
    _return_freed_memory()
    # The work is memory-bound and chunked to stay in cache; one thread avoids intra-op
    # barriers that stall badly on a busy machine.
    from splice.merge.memory import pool_budget

    with one_thread(), pooled_reads(pool_budget(job, tasks)):
        return _execute(job, tasks, sink, progress, on_output)


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
            final = merged.to(job.out_dtype or task.dtype)
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
