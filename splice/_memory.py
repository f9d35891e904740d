"""Process memory policy: freed large buffers go back to the OS at once (glibc only).

glibc serves an allocation by ``mmap`` only above its mmap threshold, and it *raises* that
threshold (up to 32 MB) each time a larger mmapped block is freed. After the first few
large frees, tensors of up to 32 MB come from the heap, and freeing them does not return
the pages: peak RSS drifts far above the live working set. Pinning the threshold at 1 MB
keeps every tensor of 1 MB and more in its own mapping, released on free. Used by the
streaming merge executor, by LAPT's full fine-tune (issue #30: peak RSS ≤ 3 GB) and by
``splice.compress.quantize`` (issue #28: each layer's activation cache is freed for the next).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["return_freed_memory"]

_M_MMAP_THRESHOLD = -3
_pinned: list[int] = []  # the threshold in force, once one is


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve allocations ≥ ``threshold`` bytes by mmap for the rest of the process; returns
    whether the policy is in force (False off Linux/glibc). The lowest threshold asked for so
    far holds, so one caller (the merge's 1 MB) never undoes another's (LAPT's 128 KB).
    Results are unchanged: only where the allocator puts buffers."""
    if sys.platform != "linux":
        return False
    threshold = min([threshold, *_pinned])
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(_M_MMAP_THRESHOLD, threshold):
            return False
    except (OSError, AttributeError):
        return False
    _pinned[:] = [threshold]
    return True
