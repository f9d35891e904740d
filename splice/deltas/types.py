"""The delta value types: a change ΔW to one tensor of a base model, in some parametrisation.

A fine-tuned checkpoint minus its base is a set of :class:`Dense` deltas; a LoRA adapter is a
set of :class:`LowRank` deltas; sparsified or masked task vectors are :class:`Sparse` /
:class:`Masked`; T-Switch's 1-bit task vectors are :class:`Switch`. Every delta can
``materialize()`` the full ΔW, reports ``nbytes`` of what it stores, and round-trips losslessly
through :func:`splice.deltas.save_deltas` / :func:`splice.deltas.load_deltas`. All are keyed by
the *base model's* tensor name (e.g. ``encoder.layer.0.output.dense.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from splice._lazy import lazy_import
from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = [
    "Delta",
    "Dense",
    "LowRank",
    "Masked",
    "Sparse",
    "Switch",
    "is_mergeable",
    "lora_scale",
    "task_vector",
]


def is_mergeable(t: Tensor) -> bool:
    """Floating-point tensors carry task information; int/bool buffers are copied (spec §0)."""
    return t.is_floating_point() or t.is_complex()


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA scaling: ``alpha / r`` (Hu et al.) or rsLoRA's ``alpha / sqrt(r)``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class Delta:
    """Base class: ``materialize() -> Tensor`` of ``shape``; serialisable tensors + meta."""

    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type[Delta]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Delta._kinds[cls.kind] = cls

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def materialize(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors, by field name."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable non-tensor fields."""
        return {}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Delta:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass(frozen=True, eq=False)
class Dense(Delta):
    """A full ΔW tensor."""

    kind: ClassVar[str] = "dense"
    value: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    def materialize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.value if dtype is None else self.value.to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"value": self.value}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Dense:
        return cls(tensors["value"])


@dataclass(frozen=True, eq=False)
class LowRank(Delta):
    """ΔW = scale · B @ A, reshaped to ``target_shape`` (and transposed if ``transpose``).

    ``B`` is (out, r) and ``A`` is (r, in). Conv kernels store ``A`` as (r, in, kh, kw) and
    ``B`` as (out, r, 1, 1), as peft does; both are flattened to 2-D before the product.
    ``transpose`` covers weights stored (in, out): GPT-2 ``Conv1D`` and ``nn.Embedding``.
    """

    kind: ClassVar[str] = "lowrank"
    B: Tensor
    A: Tensor
    scale: float = 1.0
    target_shape: tuple[int, ...] | None = None
    transpose: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> torch.Size:
        if self.target_shape is not None:
            return torch.Size(self.target_shape)
        out, inn = self.B.shape[0], self.A[0].numel()
        return torch.Size((inn, out) if self.transpose else (out, inn))

    def materialize(self, dtype: torch.dtype | None = None) -> Tensor:
        compute = torch.promote_types(self.B.dtype, torch.float32)
        b = self.B.reshape(self.B.shape[0], -1).to(compute)
        a = self.A.reshape(self.A.shape[0], -1).to(compute)
        w = (b @ a) * self.scale
        if self.transpose:
            w = w.T
        w = w.reshape(self.shape)
        return w.to(dtype or self.B.dtype).contiguous()

    def tensors(self) -> dict[str, Tensor]:
        return {"B": self.B, "A": self.A}

    def meta(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "target_shape": list(self.target_shape) if self.target_shape else None,
            "transpose": self.transpose,
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> LowRank:
        shape = meta.get("target_shape")
        return cls(
            tensors["B"],
            tensors["A"],
            scale=float(meta.get("scale", 1.0)),
            target_shape=tuple(shape) if shape else None,
            transpose=bool(meta.get("transpose", False)),
        )


@dataclass(frozen=True, eq=False)
class Masked(Delta):
    """ΔW = value ⊙ mask, with a boolean mask of the same shape (e.g. TIES trim, DARE drop)."""

    kind: ClassVar[str] = "masked"
    value: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.shape != self.value.shape:
            raise SpliceError("Masked delta needs a bool mask of the value's shape")

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    def materialize(self, dtype: torch.dtype | None = None) -> Tensor:
        out = torch.where(self.mask, self.value, torch.zeros((), dtype=self.value.dtype))
        return out if dtype is None else out.to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"value": self.value, "mask": self.mask}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Masked:
        return cls(tensors["value"], tensors["mask"])


@dataclass(frozen=True, eq=False)
class Sparse(Delta):
    """ΔW given by flat int64 ``indices`` and their ``values``; zeros elsewhere."""

    kind: ClassVar[str] = "sparse"
    indices: Tensor
    values: Tensor
    size: tuple[int, ...] = field(default=())

    @classmethod
    def from_dense(cls, value: Tensor) -> Sparse:
        flat = value.reshape(-1)
        idx = torch.nonzero(flat, as_tuple=True)[0]
        return cls(idx, flat[idx].clone(), tuple(value.shape))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.size)

    def materialize(self, dtype: torch.dtype | None = None) -> Tensor:
        out = torch.zeros(math.prod(self.size), dtype=dtype or self.values.dtype)
        out[self.indices] = self.values.to(out.dtype)
        return out.reshape(self.size)

    def tensors(self) -> dict[str, Tensor]:
        return {"indices": self.indices, "values": self.values}

    def meta(self) -> dict[str, Any]:
        return {"size": list(self.size)}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Sparse:
        return cls(tensors["indices"], tensors["values"], tuple(meta["size"]))


def _pack_bits(bits: Tensor) -> Tensor:
    """Bool vector → uint8, eight bits per byte, little-endian within a byte."""
    pad = (-bits.numel()) % 8
    padded = torch.cat([bits.reshape(-1), bits.new_zeros(pad)]).reshape(-1, 8)
    weights = 1 << torch.arange(8, dtype=torch.uint8)
    return (padded.to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, count: int) -> Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:count].bool()


@dataclass(frozen=True, eq=False)
class Switch(Delta):
    """ΔW = κ·M⊙S: a 1-bit task vector (T-Switch, spec merging.md §12.3), stored bit-packed.

    ``signs`` holds one bit per kept entry in flat order (1 = negative). The support is either
    a ``bitmap`` (⌈P/8⌉ bytes) or int32 ``indices`` (4 bytes per kept entry) — whichever is
    smaller (spec §12.5 SASS, one unit = one tensor). Which entries to keep and the scale are
    the method's choice (:func:`splice.merge.methods.tswitch.switch_delta`); :meth:`pack`
    stores them.
    """

    kind: ClassVar[str] = "switch"
    scale: Tensor
    signs: Tensor
    size: tuple[int, ...]
    count: int
    bitmap: Tensor | None = None
    indices: Tensor | None = None
    dtype: str = "float32"

    @classmethod
    def pack(cls, tau: Tensor, keep: Tensor, scale: Tensor) -> Switch:
        """Store ``scale·keep⊙sign(tau)``: ``keep`` is a bool mask over ``tau``'s flat entries
        and ``scale`` the fp32 scalar κ."""
        flat = tau.detach().reshape(-1).float().cpu()
        idx = torch.nonzero(keep.reshape(-1), as_tuple=True)[0]
        count = idx.numel()
        as_indices = 4 * count < math.ceil(flat.numel() / 8) and flat.numel() < 2**31
        return cls(
            scale=scale.reshape(1),
            signs=_pack_bits(flat[idx] < 0),
            size=tuple(tau.shape),
            count=count,
            bitmap=None if as_indices else _pack_bits(keep.reshape(-1)),
            indices=idx.to(torch.int32) if as_indices else None,
            dtype=str(tau.dtype).removeprefix("torch."),
        )

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.size)

    def support(self) -> Tensor:
        """Flat int64 indices of the kept entries, ascending."""
        if self.indices is not None:
            return self.indices.long()
        numel = math.prod(self.size)
        return torch.nonzero(_unpack_bits(self.bitmap, numel), as_tuple=True)[0]

    def materialize(self, dtype: torch.dtype | None = None) -> Tensor:
        out = torch.zeros(math.prod(self.size), dtype=torch.float32)
        negative = _unpack_bits(self.signs, self.count)
        kappa = self.scale.float()
        out[self.support()] = torch.where(negative, -kappa, kappa)
        return out.reshape(self.size).to(dtype or getattr(torch, self.dtype))

    def tensors(self) -> dict[str, Tensor]:
        stored = {"scale": self.scale, "signs": self.signs}
        if self.bitmap is not None:
            stored["bitmap"] = self.bitmap
        if self.indices is not None:
            stored["indices"] = self.indices
        return stored

    def meta(self) -> dict[str, Any]:
        return {"size": list(self.size), "count": self.count, "dtype": self.dtype}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Switch:
        return cls(
            scale=tensors["scale"],
            signs=tensors["signs"],
            size=tuple(meta["size"]),
            count=int(meta["count"]),
            bitmap=tensors.get("bitmap"),
            indices=tensors.get("indices"),
            dtype=str(meta.get("dtype", "float32")),
        )


def task_vector(
    base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], *, strict: bool = True
) -> Iterator[tuple[str, Dense]]:
    """Yield ``(name, Dense(tuned - base))`` per float tensor, lazily, in base order.

    Integer/bool buffers are skipped (spec merging.md §0). ``base`` and ``tuned`` may be any
    mappings, including lazy :class:`splice.io.Checkpoint` objects, so only one pair of tensors
    is in memory at a time.

    Raises:
        SpliceError: a tensor is missing in ``tuned`` (when ``strict``) or shapes differ.
    """
    for name in base:
        if name not in tuned:
            if strict:
                raise SpliceError(
                    "tensor missing from the fine-tuned checkpoint",
                    where=name,
                    fix="pass strict=False to skip tensors the fine-tune lacks",
                )
            continue
        b, t = base[name], tuned[name]
        if not is_mergeable(b):
            continue
        if b.shape != t.shape:
            raise SpliceError(
                f"shape {tuple(t.shape)} differs from base {tuple(b.shape)}",
                where=name,
                fix="both checkpoints must share one architecture",
            )
        yield name, Dense(t.to(torch.promote_types(t.dtype, b.dtype)) - b)
