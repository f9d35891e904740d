"""Process memory policy: freed large buffers go back to the OS at once (glibc only).

glibc serves an allocation by ``mmap`` only above its mmap threshold, and it *raises* that
threshold (up to 32 MB) each time a larger mmapped block is freed. After the first few
large frees, tensors of up to 32 MB come from the heap, and freeing them does not return
the pages: peak RSS drifts far above the live working set. Pinning the threshold at 1 MB
keeps every tensor of 1 MB and more in its own mapping, released on free. Used by the
streaming merge executor, by LAPT's full fine-tune (issue #30: peak RSS ≤ 3 GB) and by
``splice.compress.quantize`` (issue #28: each layer's activation cache is freed for the next).

:func:`one_arena` keeps every thread's allocations in glibc's main arena: threads that take
turns (the paused calibration forwards of ``splice.compress.lockstep``) otherwise each get an
arena of their own, whose freed blocks stay resident (EfficientNet-Lite0 at 1,000 samples:
~120 MB across its 20 forwards).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["one_arena", "return_freed_memory"]

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_pinned: list[int] = []  # the threshold in force, once one is


def _mallopt(param: int, value: int) -> bool:
    if sys.platform != "linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def one_arena() -> bool:
    """Threads started from now on allocate from glibc's main arena (``M_ARENA_MAX`` 1; in
    force only where the process has not yet had more than 8 arenas, when glibc fixes its
    limit). For threads that take turns rather than run together; returns whether the call
    was accepted (False off Linux/glibc). Results are unchanged: only where buffers live."""
    return _mallopt(_M_ARENA_MAX, 1)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve allocations ≥ ``threshold`` bytes by mmap for the rest of the process; returns
    whether the policy is in force (False off Linux/glibc). The lowest threshold asked for so
    far holds, so one caller (the merge's 1 MB) never undoes another's (LAPT's 128 KB).
    Results are unchanged: only where the allocator puts buffers."""
    threshold = min([threshold, *_pinned])
    if not _mallopt(_M_MMAP_THRESHOLD, threshold):
        return False
    _pinned[:] = [threshold]
    return True
