"""Tensor dtypes as plain data: what headers, recipes and plans need, without torch.

A dtype is named as torch names it (``"float32"``, ``"bfloat16"``); :data:`SAFETENSORS` maps
the codes of safetensors headers to those names, :data:`ITEMSIZE` gives bytes per element.
The helpers accept a name or a ``torch.dtype`` (``str(torch.float32)`` is
``"torch.float32"``), so code that sees both never imports torch to compare them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLOATING",
    "ITEMSIZE",
    "SAFETENSORS",
    "DTypeLike",
    "dtype_name",
    "is_floating",
    "itemsize",
    "safetensors_code",
    "to_torch",
]

DTypeLike: TypeAlias = "str | torch.dtype"
"""A dtype name (``"float32"``) or a ``torch.dtype``."""

SAFETENSORS: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
"""safetensors header code → dtype name (the dtypes splice reads and writes)."""
_CODES = {name: code for code, name in SAFETENSORS.items()}

ITEMSIZE: dict[str, int] = {
    **dict.fromkeys(["float64", "int64", "uint64"], 8),
    **dict.fromkeys(["float32", "int32", "uint32"], 4),
    **dict.fromkeys(["float16", "bfloat16", "int16", "uint16"], 2),
    **dict.fromkeys(["int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2"], 1),
}
"""Bytes per element of each dtype name."""

FLOATING = frozenset(["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
"""The floating-point dtype names (``torch.dtype.is_floating_point``)."""


def dtype_name(dtype: DTypeLike) -> str:
    """``"float32"`` for ``"float32"`` or ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: DTypeLike) -> int:
    """Bytes per element (a dtype outside the table, e.g. from a pickle, asks torch)."""
    name = dtype_name(dtype)
    return ITEMSIZE[name] if name in ITEMSIZE else to_torch(name).itemsize


def is_floating(dtype: DTypeLike) -> bool:
    """Whether the dtype is floating point (what merge methods can average)."""
    name = dtype_name(dtype)
    return name in FLOATING if name in ITEMSIZE else to_torch(name).is_floating_point


def safetensors_code(dtype: DTypeLike) -> str | None:
    """The safetensors header code (``"F32"``) of a dtype; None if safetensors has none."""
    return _CODES.get(dtype_name(dtype))


def to_torch(dtype: DTypeLike) -> torch.dtype:
    """The ``torch.dtype`` of a name (imports torch)."""
    return getattr(importlib.import_module("torch"), dtype_name(dtype))
