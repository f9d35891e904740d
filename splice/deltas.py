"""Static deltas: a change ΔW to one tensor of a base model, in some parametrisation.

A fine-tuned checkpoint minus its base is a set of :class:`Dense` deltas; a LoRA adapter is a
set of :class:`LowRank` deltas; sparsified or masked task vectors are :class:`Sparse` /
:class:`Masked`. Every delta can ``materialize()`` the full ΔW, reports ``nbytes`` of what it
stores, and round-trips losslessly through :func:`save_deltas` / :func:`load_deltas`.
All are keyed by the *base model's* tensor name (e.g. ``encoder.layer.0.output.dense.weight``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = [
    "Delta",
    "Dense",
    "LowRank",
    "Masked",
    "Sparse",
    "is_mergeable",
    "load_deltas",
    "lora_scale",
    "save_deltas",
    "task_vector",
]

DELTA_FORMAT = "splice.deltas/1"


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


def save_deltas(deltas: Mapping[str, Delta], path: str | Path) -> Path:
    """Write deltas to one ``.safetensors`` file; kinds and scalars go in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    flat: dict[str, Tensor] = {}
    index: dict[str, dict[str, Any]] = {}
    for name, d in deltas.items():
        for field_name, t in d.tensors().items():
            flat[f"{name}::{field_name}"] = t.detach().contiguous().cpu()
        index[name] = {"kind": d.kind, **d.meta()}
    meta = {"format": DELTA_FORMAT, "deltas": json.dumps(index)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(flat, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_deltas(path: str | Path, *, base: Mapping[str, Tensor] | None = None) -> dict[str, Delta]:
    """Load deltas from a splice delta file or a PEFT LoRA adapter directory.

    A PEFT dir yields :class:`LowRank` deltas keyed by the base model's tensor names; its
    ``modules_to_save`` tensors (full weights) become :class:`Dense` deltas against ``base``.
    With ``base`` given, every target must exist in it with the delta's shape.

    Raises:
        SpliceError: not a delta file / adapter, full modules without ``base``, target missing
            from ``base`` or of another shape.
    """
    from splice.io import open_checkpoint

    path = Path(path)
    ckpt = open_checkpoint(path)
    deltas: dict[str, Delta]
    if ckpt.format == "peft":
        from splice.io.peft import peft_full_tensors, peft_lowrank_deltas

        deltas = dict(peft_lowrank_deltas(ckpt))
        full = peft_full_tensors(ckpt)
        if full and base is None:
            raise SpliceError(
                f"adapter stores {len(full)} full module tensor(s) (modules_to_save), "
                f"e.g. {next(iter(full))!r}",
                where=str(path),
                fix="pass base= (the base checkpoint) to express them as deltas",
            )
        for name, value in full.items():
            if base is not None and name in base:
                deltas[name] = Dense(value.to(base[name].dtype) - base[name])
            else:
                deltas[name] = Dense(value)
    else:
        deltas = _load_splice_deltas(ckpt, path)
    if base is not None:
        _check_targets(deltas, base, path)
    return deltas


def _load_splice_deltas(ckpt: Any, path: Path) -> dict[str, Delta]:
    meta = ckpt.metadata
    if meta.get("format") != DELTA_FORMAT:
        raise SpliceError(
            "not a splice delta file or PEFT adapter dir",
            where=str(path),
            fix="create one with splice.save_deltas or point at an adapter dir",
        )
    index = json.loads(meta["deltas"])
    deltas: dict[str, Delta] = {}
    for name, info in index.items():
        info = dict(info)
        cls = _delta_kind(info.pop("kind"), name, path)
        parts = {key.split("::", 1)[1]: ckpt[key] for key in ckpt.names_with_prefix(f"{name}::")}
        deltas[name] = cls.from_parts(parts, info)
    return deltas


def _delta_kind(kind: str, name: str, path: Path) -> type[Delta]:
    """The Delta class for ``kind``; kinds defined beside their method (T-Switch's ``switch``)
    register when the merge methods are imported, so import them once before giving up."""
    if kind not in Delta._kinds:
        from splice.merge.base import methods

        methods.discover()
    cls = Delta._kinds.get(kind)
    if cls is None:
        raise SpliceError(f"unknown delta kind {kind!r} for {name!r}", where=str(path))
    return cls


def _check_targets(deltas: Mapping[str, Delta], base: Mapping[str, Tensor], path: Path) -> None:
    for name, d in deltas.items():
        if name not in base:
            raise SpliceError(
                f"delta target {name!r} is not in the base model",
                where=str(path),
                fix="use the base model this adapter was trained on",
            )
        shape = base.info(name).shape if hasattr(base, "info") else tuple(base[name].shape)
        if tuple(d.shape) != tuple(shape):
            raise SpliceError(
                f"delta for {name!r} has shape {tuple(d.shape)}, base has {tuple(shape)}",
                where=str(path),
                fix="use the base model this adapter was trained on",
            )
