"""The engine's data types: a merge job, its inputs, and the output tensors it plans.

A :class:`MergeJob` (built by :func:`splice.merge.api.build_job` from a recipe, or by hand)
names the method, the inputs (:class:`Source`) and how parameters resolve per tensor;
:func:`splice.merge.engine.preflight.check` turns it into :class:`TensorTask` s (what
:func:`splice.merge.engine.executor.execute` streams) and records what it found in
:class:`Checked`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from splice._names import INDEX
from splice.deltas import Delta
from splice.io import DTypeLike, dtype_name, to_torch
from splice.merge.base import HyperParams, MergeContext, MergeMethod, MergeTransform
from splice.merge.engine.arch import Architecture

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "Checked",
    "Dropped",
    "MergeJob",
    "MergeOptions",
    "Resolver",
    "Sink",
    "Source",
    "TensorTask",
    "layer_indices",
    "stored_shape_dtype",
]

VocabPolicy = Literal["base", "union", "intersect"]
Resolver = Callable[[str | None, float], tuple[HyperParams, list[HyperParams]]]
"""``(tensor name or None for model level, depth) -> (params, per-input params)``."""


class Sink(Protocol):
    def write(self, name: str, tensor: Tensor) -> None: ...


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge: the keyword arguments of :func:`splice.merge.merge` and
    :func:`splice.merge.plan_merge` (and the options of ``splice merge``), in one place.

    ``dtype``/``out_dtype``/``seed`` override the recipe's, ``output``/``rank`` its output
    kind and adapter rank. ``progress`` None: a bar when stderr is a terminal.
    ``checksums=False`` leaves the SHA-256 of inputs and outputs out of the ledger.
    ``intermediates``/``lazy``: for multi-document recipes (:mod:`splice.merge.pipeline`),
    the dir of named stages' outputs and whether finished ones are reused.
    """

    force: bool = False
    max_shard_size: int | str = "5GB"
    device: str = "cpu"
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None
    progress: bool | None = None
    allow_missing: bool = False
    max_memory: int | str | None = None
    output: str | None = None
    rank: int | str | None = None
    checksums: bool = True
    intermediates: str | None = None
    lazy: bool = False


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
    """Everything :func:`~splice.merge.engine.executor.execute` needs; built by
    :func:`splice.merge.api.build_job` or by hand.

    ``allow_missing``: a tensor some inputs lack is merged with the base's value in their place
    (a zero task vector; copied from the reference without a base), one only some inputs have
    is dropped; both are errors otherwise. ``vocab``: how embedding/head rows that differ
    between inputs are reconciled (:mod:`splice.merge.engine.vocab`). ``read_ahead``: read the next
    tensor while this one is merged (faster; one more set of inputs in memory).
    """

    method: MergeMethod
    models: list[Source]
    resolve: Resolver
    base: Source | None = None
    transforms: list[tuple[MergeTransform, HyperParams]] = field(default_factory=list)
    seed: int = 0
    dtype: DTypeLike | None = None
    """Compute dtype (None: float32, float64 for float64 inputs); kept by name."""
    out_dtype: DTypeLike | None = None
    """Output dtype of merged tensors (None: each tensor's own); kept by name."""
    device: str = "cpu"
    allow_missing: bool = False
    vocab: VocabPolicy | None = None
    tokens: Any = None
    """A :class:`~splice.merge.engine.vocab.TokenMap`: embedding/head rows re-indexed by token
    (tokenizer surgery) instead of a ``vocab`` policy."""
    read_ahead: bool = True
    on_read: Callable[[Any, Tensor], None] | None = None
    """Called with ``(TensorInfo, raw tensor)`` for every tensor read from a checkpoint file
    (the ledger's hasher follows the reads through the page cache; it never blocks)."""

    def __post_init__(self) -> None:
        # names, so plans need no torch; the executor makes torch dtypes of them
        self.dtype = None if self.dtype is None else dtype_name(self.dtype)
        self.out_dtype = None if self.out_dtype is None else dtype_name(self.out_dtype)

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
    dtype_name: str
    """The stored dtype's name (``"float32"``): the header's, so planning needs no torch."""
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

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype as a ``torch.dtype`` (imports torch)."""
        return to_torch(self.dtype_name)

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
    """What :func:`~splice.merge.engine.preflight.check` found: the output tensors, and
    everything the ledger must tell."""

    tasks: list[TensorTask]
    arch: Architecture
    dropped: list[Dropped] = field(default_factory=list)
    vocab: dict[str, Any] | None = None
    """Vocab report (:func:`splice.merge.engine.vocab.report`) when rows differ between inputs."""
    untied: list[str] = field(default_factory=list)
    """Heads the reference ties to its embedding but the output stores (another input
    has its own head)."""
    notes: dict[str, list[str]] = field(default_factory=dict)
    """Per output tensor, how inputs were read when not plainly (tied, missing)."""

    def note(self, name: str, text: str) -> None:
        self.notes.setdefault(name, []).append(text)


def stored_shape_dtype(mapping: Mapping[str, Tensor], name: str) -> tuple[tuple[int, ...], str]:
    """Shape and dtype name of ``mapping[name]``: from the header where the mapping has one
    (``info``, a :class:`~splice.io.Checkpoint`), so nothing is read; else from the tensor."""
    info = getattr(mapping, "info", None)
    item = info(name) if info is not None else mapping[name]
    name_of = getattr(item, "dtype_name", None)
    return tuple(item.shape), name_of if name_of is not None else dtype_name(item.dtype)


def layer_indices(names: list[str]) -> dict[str, tuple[int, int]]:
    """``name -> (block index, blocks in its stack)`` for names inside a layer stack.

    The block index is the first numeric path component (``model.layers.3.mlp…`` → 3); the
    text before it names the stack, and each stack (e.g. T5's encoder and decoder) is
    counted separately [lib, merging.md §6.7].
    :func:`splice.merge.engine.arch.infer_architecture`
    refines this with known stack names and the config.
    """
    found: dict[str, tuple[str, int]] = {}
    for name in names:
        m = INDEX.search(name)
        if m:
            found[name] = (name[: m.start()], int(m[1]))
    sizes: dict[str, int] = {}
    for prefix, i in found.values():
        sizes[prefix] = max(sizes.get(prefix, 0), i + 1)
    return {name: (i, sizes[prefix]) for name, (prefix, i) in found.items()}
