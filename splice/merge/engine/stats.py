"""Exact order statistics of float tensors by radix selection over their bits: no sort.

A float's IEEE bits split into 16-bit digits. Among non-negative floats the digits order like
the values; among negative ones the order is reversed. So the k-th smallest of a stream is
found 16 bits at a time: a 65536-bin histogram of the top digit picks the bin holding rank
k, the next pass histograms the next digit of that bin's elements only, and so on — two
passes for float32, one for float16/bfloat16, four for float64. Memory is one histogram plus
one chunk, whatever the stream's length, so whole-model top-k thresholds (TIES' global trim,
merging.md §2.3, §2.5) stream over a checkpoint exactly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from splice._lazy import lazy_import
from splice.io import DTypeLike, dtype_name, to_torch

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())


__all__ = [
    "CHUNK",
    "GATHER",
    "RadixSelect",
    "kth_largest",
    "kth_largest_each",
    "kth_smallest",
    "one_thread",
]

CHUNK = 1 << 18
"""Elements per chunk in streaming loops: bounds scratch memory to a few 1 MB buffers."""
GATHER = 1 << 16
"""Most candidates :func:`kth_smallest` gathers and ranks with ``kthvalue`` (≈ 1 MB of
scratch); a larger bin is narrowed by one more digit pass instead, so memory does not grow
with the number of tied entries (e.g. a task vector that is zero almost everywhere)."""

_BINS = 1 << 16
_HALF = _BINS // 2
_WORDS = {"float64": 4, "float32": 2, "float16": 1, "bfloat16": 1}
assert sys.byteorder == "little", "radix selection reads float digits in little-endian order"


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on one thread: this work is memory-bound, and on a busy machine the
    intra-op barriers of 65536-bin histograms stall for milliseconds each."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _words(dtype: DTypeLike) -> int:
    try:
        return _WORDS[dtype_name(dtype)]
    except KeyError:
        raise TypeError(f"radix selection needs a float tensor, got {dtype}") from None


def _digit(c: Tensor, level: int) -> Tensor:
    """The ``level``-th 16-bit digit from the top of each element, as a uint16 view (no copy)."""
    w = _words(c.dtype)
    return c.view(torch.uint16)[w - 1 - level :: w]


def _digits32(c: Tensor, level: int, scratch: Tensor | None, clear_sign: bool) -> Tensor:
    """The ``level``-th digit of each element copied into int32 (``scratch`` if given), the
    sign bit cleared if ``clear_sign``. Digits are only viewed and copied as uint16: CUDA has
    no bitwise or comparison kernels for it."""
    if scratch is None:
        scratch = torch.empty(c.numel(), dtype=torch.int32, device=c.device)
    buf = scratch[: c.numel()]
    buf.copy_(_digit(c, level))
    if clear_sign:
        buf &= _HALF - 1
    return buf


def _digit_is(c: Tensor, level: int, d: int, magnitude: bool, scratch: Tensor | None) -> Tensor:
    """Mask of the elements whose ``level``-th digit (of ``|x|`` if ``magnitude``) is ``d``."""
    return _digits32(c, level, scratch, magnitude) == d


def _chunks(x: Tensor) -> Iterator[Tensor]:
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start : start + CHUNK]


def _histogram(
    c: Tensor, level: int, hist: Tensor, scratch: Tensor, clear_sign: bool = False
) -> None:
    hist += torch.bincount(_digits32(c, level, scratch, clear_sign), minlength=_BINS)


def _top_matches(c: Tensor, d: int, magnitude: bool, scratch: Tensor | None = None) -> Tensor:
    """Mask of the elements whose top digit (of ``|x|`` if ``magnitude``) is ``d``; an int32
    ``scratch`` of at least ``c``'s size saves a chunk-sized allocation."""
    if c.dtype == torch.float32:  # one int32 mask-and-compare: the fast common case
        mask = 0x7FFF0000 if magnitude else -0x10000
        want = d << 16 if d < _HALF else (d << 16) - (1 << 32)
        out = None if scratch is None else scratch[: c.numel()]
        return torch.bitwise_and(c.view(torch.int32), mask, out=out) == want
    return _digit_is(c, 0, d, magnitude, scratch)


def _pick(hist: Tensor, k: int, negative: bool | None) -> tuple[int, int]:
    """Raw digit of the bin holding the k-th smallest, and the rank inside that bin.

    ``negative`` says whether the candidates are negative floats (digits in reverse order);
    None means the top digit, whose upper half holds the negatives, reversed.
    """
    if negative is None:
        order = torch.cat([torch.arange(_BINS - 1, _HALF - 1, -1), torch.arange(_HALF)])
    elif negative:
        order = torch.arange(_BINS - 1, -1, -1)
    else:
        order = torch.arange(_BINS)
    cum = hist[order].cumsum(0)
    i = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())
    below = int(cum[i - 1]) if i else 0
    return int(order[i]), k - below


def _float_of(digits: list[int], dtype: torch.dtype) -> float:
    words = torch.tensor(digits[::-1], dtype=torch.int32).to(torch.uint16)
    return float(words.view(dtype).item())


def kth_smallest(x: Tensor, k: int, *, magnitude: bool = False) -> Tensor:
    """Exact k-th smallest (1-based) element of a float tensor (of ``|x|`` if ``magnitude``).

    One histogram of the top 16 bits finds the bin of rank ``k``; a bin of at most
    :data:`GATHER` elements is gathered and ranked, a larger one is narrowed by the next 16
    bits the same way. Same value as ``torch.kthvalue(x.flatten(), k)``, about ten times faster
    on large tensors, with chunk-sized scratch however many entries tie (``|x|`` is never
    materialized). Returns a 0-d tensor.
    """
    _check_rank(x, k)
    with one_thread():
        return _kth_smallest(x, k, magnitude)


def _check_rank(x: Tensor, k: int) -> None:
    if not 1 <= k <= x.numel():
        raise ValueError(f"k={k} out of range for {x.numel()} elements")


def _kth_smallest(x: Tensor, k: int, magnitude: bool) -> Tensor:
    select = RadixSelect(k, x.dtype, magnitude=magnitude)
    while True:
        select._observe(x)
        if select.end_pass():
            return torch.tensor(select.value, dtype=x.dtype, device=x.device)
        if select.candidates <= GATHER:
            return select._gathered_kth(x)


def kth_largest(x: Tensor, k: int, *, magnitude: bool = False) -> Tensor:
    """Exact k-th largest (1-based) element of a float tensor (of ``|x|`` if ``magnitude``)."""
    return kth_smallest(x, x.numel() - k + 1, magnitude=magnitude)


_POOL: ThreadPoolExecutor | None = None


def kth_largest_each(
    xs: Sequence[Tensor], ks: Sequence[int], *, magnitude: bool = False
) -> list[Tensor]:
    """:func:`kth_largest` of each ``xs[i]`` for ``ks[i]``, the tensors spread over the CPU
    cores (each selection is single-threaded and memory-bound; torch releases the GIL)."""
    global _POOL
    for x, k in zip(xs, ks, strict=True):
        _check_rank(x, k)
    jobs = [(x, x.numel() - k + 1) for x, k in zip(xs, ks, strict=True)]
    with one_thread():
        if len(jobs) < 2 or (os.cpu_count() or 1) < 2 or xs[0].device.type != "cpu":
            return [_kth_smallest(x, k, magnitude) for x, k in jobs]
        if _POOL is None:
            _POOL = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="splice-select")
        return list(_POOL.map(lambda job: _kth_smallest(job[0], job[1], magnitude), jobs))


class RadixSelect:
    """Exact k-th smallest element of a stream of float tensors, 16 bits per pass.

    Call :meth:`observe` on every tensor of the stream, then :meth:`end_pass`; repeat the
    stream until ``end_pass`` returns True, then read :attr:`value`. ``k`` may be a function
    of the stream's length, resolved after the first pass (e.g. ``lambda n: n - keep + 1``).
    Every pass must see the same elements, in any order and chunking. With ``magnitude`` it
    selects among ``|x|`` without materializing it.
    """

    def __init__(
        self,
        k: int | Callable[[int], int],
        dtype: DTypeLike = "float32",
        *,
        magnitude: bool = False,
    ) -> None:
        self.dtype_name = dtype_name(dtype)  # by name: methods plan before torch is imported
        self.magnitude = magnitude
        self.passes = _words(dtype)
        self.count = 0
        self.candidates = 0
        """Elements of the stream that may still be the answer (after each pass)."""
        self._k_spec = k
        self._k = 0
        self._digits: list[int] = []
        self._hist: Tensor | None = None
        self._scratch: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return to_torch(self.dtype_name)

    @property
    def done(self) -> bool:
        return len(self._digits) == self.passes

    def observe(self, x: Tensor) -> None:
        """Add one tensor of the stream to the current pass."""
        if self.done:
            raise RuntimeError("RadixSelect already finished")
        with one_thread():
            self._observe(x)

    def _observe(self, x: Tensor) -> None:
        self._buffers(x.device)
        level = len(self._digits)
        for c in _chunks(x.to(self.dtype)):
            if level == 0:
                self.count += c.numel()
            else:
                c = self._matching(c)
            clear = self.magnitude and level == 0
            _histogram(c, level, self._hist, self._scratch, clear_sign=clear)

    def _buffers(self, device: torch.device) -> None:
        if self._hist is None or self._hist.device != device:
            self._hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
            self._scratch = torch.empty(CHUNK, dtype=torch.int32, device=device)

    def _matching(self, c: Tensor) -> Tensor:
        """The elements of chunk ``c`` whose digits fixed so far are the answer's."""
        keep = _top_matches(c, self._digits[0], self.magnitude, self._scratch)
        for i in range(1, len(self._digits)):
            keep &= _digit_is(c, i, self._digits[i], False, self._scratch)
        return c[keep]

    def _gathered_kth(self, x: Tensor) -> Tensor:
        """The answer, from the :attr:`candidates` still in the running gathered and ranked
        (one pass; use when they are few)."""
        self._buffers(x.device)
        candidates = torch.cat([self._matching(c) for c in _chunks(x.to(self.dtype))])
        self._hist = self._scratch = None
        return torch.kthvalue(candidates.abs() if self.magnitude else candidates, self._k).values

    def end_pass(self) -> bool:
        """Fix the next 16 bits of the answer; True once all bits are known."""
        if not self._digits:
            k = self._k_spec(self.count) if callable(self._k_spec) else self._k_spec
            if not 1 <= k <= self.count:
                raise ValueError(f"k={k} out of range for a stream of {self.count} elements")
            self._k = k
        hist = self._hist.cpu() if self._hist is not None else torch.zeros(_BINS, dtype=torch.int64)
        with one_thread():
            d, self._k = _pick(hist, self._k, self._negative())
        self.candidates = int(hist[d])
        self._digits.append(d)
        self._hist = None
        self._scratch = None
        return self.done

    def _negative(self) -> bool | None:
        """Whether the candidates are negative floats; None while both signs remain."""
        if self._digits:
            return self._digits[0] >= _HALF
        return False if self.magnitude else None

    @property
    def value(self) -> float:
        """The k-th smallest element (as a Python float)."""
        if not self.done:
            raise RuntimeError("RadixSelect needs more passes")
        return _float_of(self._digits, self.dtype)
