"""The merge-method protocol: a method is a pure function over the tensors of one name.

A method lives in one file under ``splice/merge/methods/``, subclasses :class:`MergeMethod`,
declares its hyperparameters as frozen pydantic models (global ``Params`` and per-input
``ModelParams``) and registers itself with ``@methods.register("name")``. The engine owns
reading, devices, dtypes and writing; it resolves per-layer values (gradients, filters) to plain
scalars before calling :meth:`MergeMethod.merge`, once per tensor name.

Methods that need a statistic over the whole model (a global top-k threshold, a norm) return
:class:`GlobalStat` objects from :meth:`MergeMethod.global_stats`; the engine streams every
tensor through them (as many passes as they ask for) before the merge pass, and hands their
results to ``merge`` through ``ctx.stats[stat.key]``.

A :class:`MergeTransform` rewrites a method's merged tensor afterwards (LiNeS depth scaling is
one): a recipe names it beside any method, and the engine applies it to every merged tensor.
Its statistics (:class:`MergedStat`) may look at the inner method's result, so the engine
computes that result during their passes too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from splice._lazy import lazy_import
from splice._registry import Registry
from splice._schema import Strict

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = [
    "GlobalStat",
    "HyperParams",
    "MergeContext",
    "MergeMethod",
    "MergeTransform",
    "MergedStat",
    "NoParams",
    "methods",
    "tensor_seed",
    "transforms",
]


class HyperParams(Strict):
    """Base for method hyperparameters: frozen, and unknown keys are errors."""


class NoParams(HyperParams):
    """For methods without hyperparameters."""


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, tensor name): stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class MergeContext:
    """What a method may know about the tensor being merged."""

    name: str
    seed: int = 0
    layer: int | None = None
    num_layers: int | None = None
    stats: Mapping[str, Any] = field(default_factory=dict)
    params: HyperParams | None = None
    """This tensor's resolved method parameters (also set while statistics observe it)."""
    model_params: list[HyperParams] | None = None
    """This tensor's resolved per-input parameters, in input order."""

    @property
    def depth(self) -> float:
        """Position in the layer stack in [0, 1]: ``layer / (num_layers - 1)``.

        mergekit's convention for gradients: tensors outside the layer stack (embeddings, final
        norm, head) are at 0, and a one-layer stack is at 1.
        """
        if self.layer is None or self.num_layers is None:
            return 0.0
        return self.layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Per-tensor RNG from (seed, name): draws on CPU so results are device-independent."""
        del device
        return torch.Generator("cpu").manual_seed(tensor_seed(self.seed, self.name))


class GlobalStat(Protocol):
    """A whole-model statistic computed in streaming passes before the merge pass."""

    key: str

    def observe(
        self, name: str, base: Tensor | None, tensors: list[Tensor], ctx: MergeContext
    ) -> None:
        """See one tensor name (all inputs) during the current pass; never modify inputs."""

    def end_pass(self) -> bool:
        """Close the current pass; return True when the statistic is final."""

    def result(self) -> Any:
        """The final value, passed to ``merge`` as ``ctx.stats[key]``."""


SVD_GPU_SCRATCH = 10.0
"""GPU scratch of a method that takes SVDs, in tensors: cuSOLVER works on copies of its input
and outputs (measured on an H200: 1024×1024 tensors held 8.5 tensors more than on the CPU)."""


class MergeMethod:
    """Base class of data-free merge methods (see module docstring)."""

    name: ClassVar[str] = ""
    pretty_name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Params: ClassVar[type[HyperParams]] = NoParams
    ModelParams: ClassVar[type[HyperParams]] = NoParams
    requires_base: ClassVar[bool] = True
    num_models: ClassVar[tuple[int, int | None]] = (1, None)
    """Allowed number of inputs besides the base: (min, max or None)."""
    delta_only: ClassVar[bool] = False
    """The result minus the base depends only on the task vectors θ_i − θ₀ (tested in
    tests/merge/output/test_adapter.py): the method merges LoRA adapters in ΔW space, without
    the base model's weights."""
    linear: ClassVar[bool] = False
    """The merged ΔW is Σ c_i ΔW_i (:meth:`coefficients`): an adapter output may concatenate
    the inputs' factors exactly (``rank: exact``)."""
    uses_svd: ClassVar[bool] = False
    """``merge`` takes SVDs (:meth:`gpu_scratch_tensors` counts cuSOLVER's copies)."""
    throughput: ClassVar[float] = 40e6
    """Bytes of input per second per pass on one CPU core, for the plan's time estimate."""

    def global_stats(
        self, params: HyperParams, model_params: list[HyperParams]
    ) -> list[GlobalStat]:
        """Statistics needed before merging; none by default."""
        return []

    def scratch_tensors(self, num_models: int) -> float:
        """Extra memory ``merge`` allocates for ``num_models`` inputs, in tensors of the
        compute size, for the memory plan (:mod:`splice.merge.engine.memory`; measured with
        ``VmHWM``, tests/merge/engine/test_memory.py keeps it within 20 %). Default: a conservative
        ``T + 2``."""
        return num_models + 2

    def scratch_for(self, num_models: int, params: HyperParams) -> float:
        """:meth:`scratch_tensors` given the method's resolved ``params``, for a method whose
        scratch depends on them; default: :meth:`scratch_tensors`."""
        return self.scratch_tensors(num_models)

    def gpu_scratch_tensors(self, num_models: int) -> float:
        """Scratch ``merge`` needs on a GPU on top of :meth:`scratch_tensors`: none, or
        :data:`SVD_GPU_SCRATCH` for a method that sets ``uses_svd``."""
        return SVD_GPU_SCRATCH if self.uses_svd else 0

    def stat_scratch_tensors(self, key: str, num_models: int, params: HyperParams) -> float:
        """Scratch of the statistics pass ``key`` (:meth:`global_stats`), in tensors of the
        compute size, given the model-level ``params``; default ``T + 1``."""
        return num_models + 1

    def stat_passes(self, key: str, words: int) -> int:
        """Passes the statistic ``key`` makes over the inputs when values are ``words``
        16-bit words wide (a radix selection makes one per word); default 1."""
        return 1

    def coefficients(self, params: HyperParams, model_params: list[HyperParams]) -> list[float]:
        """For a :attr:`linear` method, ``c_i`` with merged ΔW = Σ c_i ΔW_i for one tensor."""
        raise NotImplementedError(f"{self.name} is not a linear method")

    def check_adapter_output(
        self, params: HyperParams, model_params: list[HyperParams], where: str
    ) -> None:
        """Refuse (SpliceError) parameters whose merge of base + adapters is not base + one
        adapter (checked when an adapter output has a base); default: any are fine."""

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: HyperParams,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        """Return the merged tensor for one name (same shape as the inputs).

        ``tensors`` are fresh buffers the method may overwrite (and return); ``base`` is
        shared with the engine and must not be modified.
        """
        raise NotImplementedError


class MergedStat(Protocol):
    """Like :class:`GlobalStat`, but also sees the inner method's merged tensor (transforms)."""

    key: str

    def observe(
        self,
        name: str,
        base: Tensor | None,
        tensors: list[Tensor],
        merged: Tensor,
        ctx: MergeContext,
    ) -> None:
        """See one tensor name: all inputs and what the method merged them into."""

    def end_pass(self) -> bool:
        """Close the current pass; return True when the statistic is final."""

    def result(self) -> Any:
        """The final value, passed to ``apply`` as ``ctx.stats[key]``."""


class MergeTransform:
    """Rewrites the merged tensor of any method, per tensor name (e.g. LiNeS depth scaling).

    A recipe enables one with a top-level key named after it (``lines: {beta: 0.5}``); the
    engine calls :meth:`apply` on every merged floating-point tensor, after the method.
    """

    name: ClassVar[str] = ""
    pretty_name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Params: ClassVar[type[HyperParams]] = NoParams
    requires_base: ClassVar[bool] = True

    def global_stats(self, params: HyperParams, num_models: int) -> list[MergedStat]:
        """Statistics needed before the merge pass (they run after the method's own)."""
        return []

    def apply(
        self,
        base: Tensor | None,
        merged: Tensor,
        tensors: list[Tensor],
        params: HyperParams,
        ctx: MergeContext,
    ) -> Tensor:
        """Return the rewritten tensor (same shape as ``merged``).

        ``tensors`` are the inputs as read (the method worked on copies); none of the
        arguments may be modified except ``merged``.
        """
        raise NotImplementedError


methods: Registry[type[MergeMethod]] = Registry("merge method", "splice.merge.methods")
transforms: Registry[type[MergeTransform]] = Registry("merge transform", "splice.merge.transforms")
