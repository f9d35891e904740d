"""Shared primitives of the task-arithmetic family: trim, sign election, disjoint merge, DARE.

TIES = trim × elect × disjoint merge (merging.md §2.3); DARE = drop-and-rescale before any
combination (§3.3). Each primitive is elementwise over chunks of the flattened tensors, so
scratch memory stays a few chunks whatever the tensor size. Inputs are lists of same-shaped
tensors (a stacked ``(T, ...)`` tensor works too: it iterates as its rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from splice.merge.stats import CHUNK, kth_largest

__all__ = [
    "Aggregate",
    "Rescale",
    "dare_drop",
    "disjoint_merge",
    "elect_sign",
    "keep_count",
    "magnitude_threshold",
    "trim_",
]

Aggregate = Literal["mean", "sum", "max"]
Rescale = Literal["paper", "l1", "off"]


def _slices(n: int) -> list[slice]:
    return [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def _flat(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.reshape(-1) for t in ts]


def keep_count(density: float, n: int) -> int:
    """Entries a magnitude trim keeps: ``floor(density·n)``, at least one if ``density > 0``.

    The "at least one" and the exact count follow mergekit; the official TIES code keeps
    ``floor(density·n) + 1`` (its inclusive ``kthvalue`` threshold), one entry more.
    """
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def magnitude_threshold(delta: Tensor, density: float) -> float:
    """Smallest ``|δ|`` among the ``keep_count(density, n)`` largest (``inf`` keeps none).

    Exact, by radix selection over the float bits (no sort); ``|δ| >= threshold`` keeps
    them, plus any entries tied with the threshold.
    """
    k = keep_count(density, delta.numel())
    if k == 0:
        return float("inf")
    if k == delta.numel():
        return 0.0
    return float(kth_largest(delta, k, magnitude=True))


def trim_(delta: Tensor, threshold: float) -> Tensor:
    """Zero, in place, the entries with ``|δ| < threshold`` (TIES trim, §2.3 step 1)."""
    if threshold <= 0:
        return delta
    flat = delta.reshape(-1)
    for s in _slices(flat.numel()):
        c = flat[s]
        c.masked_fill_(c.abs() < threshold, 0)
    return delta


def elect_sign(weighted: Sequence[Tensor], zero_sign: float = 1.0) -> Tensor:
    """TIES sign election (§2.3 step 2): ``sign(Σ_t δ_t)``, ``zero_sign`` where the sum is 0.

    ``zero_sign`` = 1 is mergekit's rule (sum ≥ 0 → +); the paper code uses the model-wide
    majority sign there. Returns an int8 tensor of ±1 (0 only if ``zero_sign`` is 0).
    """
    flat = _flat(weighted)
    out = torch.empty(flat[0].numel(), dtype=torch.int8, device=flat[0].device)
    for s in _slices(out.numel()):
        total = flat[0][s].clone()
        for d in flat[1:]:
            total += d[s]
        sign = total.sign()
        sign[total == 0] = zero_sign
        out[s] = sign.to(torch.int8)
    return out.reshape(weighted[0].shape)


def disjoint_merge(
    weighted: Sequence[Tensor],
    sign: Tensor,
    weights: Sequence[float],
    aggregate: Aggregate = "mean",
    out: Tensor | None = None,
) -> Tensor:
    """TIES disjoint merge (§2.3 step 3) of weighted deltas ``w_t·δ_t`` that agree with ``sign``.

    ``mean``: ``Σ_t w_t δ_t [agree] / Σ_t w_t [agree]`` (the paper's dis-mean when all
    ``w_t = 1``; a divisor of 0 counts as 1); ``sum``: the numerator alone; ``max``: the
    largest agreeing ``|w_t δ_t|`` with the elected sign. Zeros never agree. ``out`` may be
    one of the ``weighted`` tensors: each chunk is written after it is read.
    """
    flat = _flat(weighted)
    n = flat[0].numel()
    result = (out if out is not None else torch.empty_like(weighted[0])).reshape(-1)
    flat_sign = sign.reshape(-1)
    for s in _slices(n):
        sg = flat_sign[s].to(flat[0].dtype)
        acc = torch.zeros_like(flat[0][s])
        den = torch.zeros_like(acc) if aggregate == "mean" else None
        for d, w in zip(flat, weights, strict=True):
            c = d[s]
            agree = c.sign() == sg
            if aggregate == "max":
                torch.maximum(acc, torch.where(agree, c.abs(), 0), out=acc)
            else:
                acc += torch.where(agree, c, 0)
                if den is not None:
                    den += agree * w
        if aggregate == "max":
            acc *= sg
        elif den is not None:
            den[den == 0] = 1
            acc /= den
        result[s] = acc
    return result.reshape(weighted[0].shape)


def dare_drop(
    delta: Tensor, p: float, generator: torch.Generator, rescale: Rescale = "paper"
) -> Tensor:
    """DARE (§3.3), in place: drop each entry with probability ``p``, then rescale.

    ``paper``: survivors × 1/(1−p) (unbiased); ``l1``: survivors scaled so ``‖δ‖₁`` is kept
    (mergekit's dare_*, no change when either norm is below 1e-7); ``off``: no rescale
    (DropOnly). The mask is drawn on CPU from ``generator`` chunk by chunk, so it does not
    depend on the device. ``p >= 1`` drops everything, without rescale.
    """
    if p <= 0:
        return delta
    flat = delta.reshape(-1)
    before = after = 0.0
    for s in _slices(flat.numel()):
        c = flat[s]
        if rescale == "l1":
            before += float(c.abs().sum())
        drop = torch.rand(c.numel(), generator=generator) < p
        c.masked_fill_(drop.to(c.device), 0)
        if rescale == "l1":
            after += float(c.abs().sum())
    if p >= 1 or rescale == "off":
        return delta
    if rescale == "paper":
        return delta.mul_(1.0 / (1.0 - p))
    if before < 1e-7 or after < 1e-7:
        return delta
    return delta.mul_(before / after)
