"""Uninitialised byte buffers for tensor reads, backed by transparent huge pages on Linux.

A ``bytearray`` is zero-filled before the read overwrites it (one wasted pass over memory),
and with 4 KB pages a 100 MB buffer costs 25,000 page faults. ``torch.empty`` skips the fill;
``madvise(MADV_HUGEPAGE)`` on the buffer's 2 MB-aligned interior lets the kernel map it in
2 MB pages where transparent huge pages are enabled in ``madvise`` mode (the default on many
distributions). Reading a 0.67 GB checkpoint from the page cache measured 0.37 s → 0.21 s.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():  # -> ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_bytes(n: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``n`` bytes (huge pages advised when ≥ 4 MB)."""
    t = torch.empty(n, dtype=torch.uint8)
    madvise = _madvise() if n >= 2 * _HUGE else None
    if madvise is not None:
        ptr = t.data_ptr()
        start, end = -(-ptr // _HUGE) * _HUGE, (ptr + n) // _HUGE * _HUGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: failure is harmless
    return t
