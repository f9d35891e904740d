"""Reuse of large read buffers during a merge, within the memory plan.

Every tensor read lands in a fresh buffer. For buffers of 1 MB and more the allocator maps
new pages and the kernel zero-fills them before the read overwrites them: on a 3×168M merge
that is a large part of the system time. :func:`pooled_reads` keeps the buffers it hands out
and hands one out again once no tensor uses it any more — known from its storage's reference
count, so a buffer still referenced anywhere (a view, a numpy array, an output the caller
keeps) is never reused. Only a free buffer of exactly the requested size is reused.

Bound. A reuse trades a free buffer for a live one and a tensor dying trades back, so the
pool's total changes only when it allocates. Before allocating, it releases free buffers
until its total plus the new buffer fits ``budget`` (or none is left). So the pool holds at
most ``max(budget, live buffers)``; the engine sets ``budget`` to the plan's peak minus the
most that anything else can hold at once (:func:`splice.merge.engine.memory.pool_budget`), and the
plan's peak still holds. With ``budget=0`` every allocation first releases every free buffer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from splice._lazy import lazy_import
from splice.io._hints import empty_bytes

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch", globals())

__all__ = ["buffer", "pooled_reads"]

MIN_BYTES = 1 << 20
"""Smaller buffers come from the allocator's heap, which reuses them anyway."""


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """Buffers handed out by :meth:`get`, reused when no tensor refers to them (module doc)."""

    def __init__(self, budget: int = 0) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._bufs: list[torch.Tensor] = []
        self._alone = _use_count(torch.empty(1, dtype=torch.uint8))
        """The count of a storage only the pool's own tensor holds (as measured here)."""
        self.reused = self.allocated = 0

    def _free(self, b: torch.Tensor) -> bool:
        return _use_count(b) == self._alone

    def get(self, n: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of ``n`` bytes: a free pooled one, or a new one."""
        with self._lock:
            for b in self._bufs:
                if b.numel() == n and self._free(b):
                    self.reused += 1
                    return b.detach()  # a new alias: the storage counts it while it lives
            total = sum(b.numel() for b in self._bufs)
            kept = []
            for b in self._bufs:
                if total + n > self.budget and self._free(b):
                    total -= b.numel()
                else:
                    kept.append(b)
            b = empty_bytes(n)
            self._bufs = kept
            self._bufs.append(b)
            self.allocated += 1
            return b.detach()

    def clear(self) -> None:
        with self._lock:
            self._bufs = []


_active: BufferPool | None = None


def _supported() -> bool:
    try:
        _use_count(torch.empty(0))
    except (AttributeError, RuntimeError, TypeError):  # a torch without the private call
        return False
    return True


@contextlib.contextmanager
def pooled_reads(budget: int = 0) -> Iterator[BufferPool | None]:
    """Within the block, large read buffers are reused (module doc); None where the running
    torch cannot tell whether a buffer is still used (then nothing changes)."""
    global _active
    if _active is not None or not _supported():
        yield _active
        return
    pool = _active = BufferPool(budget)
    try:
        yield pool
    finally:
        _active = None
        pool.clear()


def buffer(n: int) -> torch.Tensor:
    """A read buffer of ``n`` bytes: from the active pool for large ones, else fresh."""
    pool = _active
    if pool is not None and n >= MIN_BYTES:
        return pool.get(n)
    return empty_bytes(n)
