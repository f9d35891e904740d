"""A strict safetensors header parser and a positioned reader that cannot SIGBUS.

The header is validated completely before any data is touched: length within the file,
UTF-8 JSON object, no duplicate keys, known dtypes, shapes that match byte counts, offsets
that tile the data section exactly (sorted, no gap, no overlap), sane tensor names.
Tensors are read with ``preadv`` into fresh buffers, not memory-mapped: a file truncated
while we read gives a clean error instead of a bus error, and peak memory stays one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splice.errors import SpliceError
from splice.io._dtypes import ITEMSIZE, SAFETENSORS, is_floating, itemsize, to_torch
from splice.io._pool import buffer

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f\\]|(^|/)\.\.(/|$)|^/")


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor; no data is read to build it.

    ``dtype_name`` is torch's name of the dtype (``"float32"``); :attr:`dtype` is the
    ``torch.dtype`` (importing torch), the other facts need no torch.
    """

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    nbytes: int
    file: Path
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return to_torch(self.dtype_name)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype_name)

    @property
    def is_floating_point(self) -> bool:
        return is_floating(self.dtype_name)


def check_tensor_name(name: str, where: str) -> None:
    """Refuse names that are empty, path-like (``../x``, ``/x``) or carry control characters."""
    if not name or _BAD_NAME.search(name):
        raise SpliceError(
            f"invalid tensor name {name!r}",
            where=where,
            fix="tensor names must be non-empty dotted identifiers, not paths",
        )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise SpliceError(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return tensor infos (file order) and metadata."""
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SpliceError(
                    f"file is {size} bytes, too short for a safetensors header",
                    where=where,
                    fix="the file is truncated or not safetensors; re-download or re-save it",
                )
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SpliceError(
                    f"header length {n} runs past the end of the {size}-byte file",
                    where=where,
                    fix="the file is truncated or corrupt; re-download or re-save it",
                )
            raw = f.read(n)
    except OSError as e:
        raise SpliceError(f"cannot read: {e.strerror}", where=where) from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise SpliceError("header is not UTF-8", where=where, fix="file is corrupt") from e
    except SpliceError as e:
        raise SpliceError(e.what, where=where, fix="file is corrupt or was crafted") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise SpliceError("header is not valid JSON", where=where, fix="file is corrupt") from e
    if not isinstance(header, dict):
        raise SpliceError("header is not a JSON object", where=where, fix="file is corrupt")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise SpliceError("__metadata__ must map strings to strings", where=where)
    data_start = 8 + n
    infos = [_parse_entry(name, entry, path) for name, entry in header.items()]
    _check_offsets(infos, size - data_start, where)
    ordered = sorted(infos, key=lambda i: i.offset)
    return {i.name: _shift(i, data_start) for i in ordered}, meta


def _parse_entry(name: str, entry: object, path: Path) -> TensorInfo:
    where = f"{path}:{name}"
    check_tensor_name(name, str(path))
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SpliceError(
            "tensor entry must have exactly dtype, shape and data_offsets",
            where=where,
            fix="file is corrupt or was written by a non-conforming tool",
        )
    dtype = SAFETENSORS.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SpliceError(
            f"unsupported dtype {entry['dtype']!r}",
            where=where,
            fix=f"supported: {', '.join(SAFETENSORS)}",
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise SpliceError(f"bad shape {shape!r}", where=where, fix="file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise SpliceError(f"bad data_offsets {offsets!r}", where=where, fix="file is corrupt")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end < begin or end - begin != nbytes:
        raise SpliceError(
            f"shape {shape} of {entry['dtype']} needs {nbytes} bytes, offsets give {end - begin}",
            where=where,
            fix="file is corrupt",
        )
    return TensorInfo(name, tuple(shape), dtype, nbytes, path, begin)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62


def _check_offsets(infos: list[TensorInfo], data_len: int, where: str) -> None:
    pos = 0
    for info in sorted(infos, key=lambda i: (i.offset, i.nbytes)):
        if info.offset != pos:
            kind = "overlaps the previous tensor" if info.offset < pos else "leaves a gap"
            raise SpliceError(
                f"tensor {info.name!r} at byte {info.offset} {kind} (expected {pos})",
                where=where,
                fix="file is corrupt or was crafted; re-save it with safetensors",
            )
        pos += info.nbytes
    if pos != data_len:
        raise SpliceError(
            f"data section is {data_len} bytes but tensors cover {pos}",
            where=where,
            fix="the file is truncated or has trailing bytes; re-download or re-save it",
        )


def _shift(info: TensorInfo, start: int) -> TensorInfo:
    return TensorInfo(
        info.name, info.shape, info.dtype_name, info.nbytes, info.file, info.offset + start
    )


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a positioned read into a fresh (or, in a merge, a reused) buffer:
    no mmap, no SIGBUS."""
    buf = buffer(info.nbytes)
    try:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view, got = buf.numpy().data, 0
            while got < info.nbytes:
                n = os.preadv(fd, [view[got:]], info.offset + got)
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
    except OSError as e:
        raise SpliceError(
            f"cannot read tensor: {e.strerror}", where=f"{info.file}:{info.name}"
        ) from e
    if got != info.nbytes:
        raise SpliceError(
            f"file ended after {got} of {info.nbytes} bytes",
            where=f"{info.file}:{info.name}",
            fix="the file was truncated (possibly while reading); re-download or re-save it",
        )
    return buf.view(info.dtype).reshape(info.shape)
