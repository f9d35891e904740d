"""Readers for the packaged image formats: IDX (MNIST family) and hash-pinned numpy pickles."""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from splice.data.registry import Source
from splice.errors import SpliceError

__all__ = ["read_idx", "read_numpy_pickle"]


def read_idx(path: Path) -> np.ndarray:
    """A gzip'd IDX file (ubyte data): magic 0x0000 08 ndim, big-endian dims, then bytes."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:3] != b"\x00\x00\x08":
        raise SpliceError("not a ubyte IDX file", where=str(path))
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class _NumpyOnly(pickle.Unpickler):
    """Allows only the globals numpy needs to rebuild a plain ndarray."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
            ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise SpliceError(f"refusing pickle global {module}.{name}", fix="pin the package")
        return allowed[(module, name)]


def read_numpy_pickle(source: Source) -> np.ndarray:
    """Unpickle a gzip'd ndarray after its sha256 check, allowing numpy globals only."""
    data = gzip.decompress(source.locate().read_bytes())
    arr = _NumpyOnly(io.BytesIO(data)).load()
    if not isinstance(arr, np.ndarray) or arr.dtype == object:
        raise SpliceError("pickle is not a plain numpy array", where=source.path)
    return arr
