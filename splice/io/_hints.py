"""Linux memory and I/O hints: huge-page read buffers and early writeback. Advice only: on
other systems, or when a call fails, nothing changes but speed.

Read buffers. A ``bytearray`` is zero-filled before the read overwrites it (one wasted pass
over memory), and with 4 KB pages a 100 MB buffer costs 25,000 page faults. ``torch.empty``
skips the fill; ``madvise(MADV_HUGEPAGE)`` on the buffer's 2 MB-aligned interior lets the
kernel map it in 2 MB pages where transparent huge pages are enabled in ``madvise`` mode (the
default on many distributions). Reading a 0.67 GB checkpoint from the page cache measured
0.37 s → 0.21 s.

Writeback. The kernel writes dirty pages out ~30 s later or at ``fsync``; an atomic publish
must ``fsync`` before the rename, and then waits for the whole output (0.3 s for 0.67 GB
here). ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` after each tensor starts its writeback at
once, so it overlaps the rest of the work and the final ``fsync`` finds little left
(measured 0.3 s → 0.02 s).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import TYPE_CHECKING

from splice._lazy import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch", globals())


_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _libc(name: str, *argtypes: type):  # -> ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def empty_bytes(n: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``n`` bytes (huge pages advised when ≥ 4 MB)."""
    t = torch.empty(n, dtype=torch.uint8)
    if n >= 2 * _HUGE:
        madvise = _libc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        ptr = t.data_ptr()
        start, end = -(-ptr // _HUGE) * _HUGE, (ptr + n) // _HUGE * _HUGE
        if madvise is not None and end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return t


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` of ``fd`` to disk now, without waiting."""
    fn = _libc("sync_file_range", ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    if fn is not None and nbytes:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
