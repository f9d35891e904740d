"""Shared primitives of the task-arithmetic family: trim, sign election, disjoint merge, DARE.

TIES = trim × elect × disjoint merge (merging.md §2.3); DARE = drop-and-rescale before any
combination (§3.3). ``trim``, ``elect_sign`` and ``disjoint_merge`` are pure elementwise
functions: methods call them on cache-sized chunks of the flattened tensors
(:func:`chunk_slices`), so a whole merge step runs while the chunk is in cache and scratch
memory stays a few chunks whatever the tensor size. Lists of same-shaped tensors may also be
a stacked ``(T, ...)`` tensor (it iterates as its rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from splice._lazy import lazy_import
from splice.merge.engine.stats import kth_largest_each

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = [
    "CHUNK",
    "Aggregate",
    "Rescale",
    "chunk_slices",
    "dare_drop_",
    "disjoint_merge",
    "elect_sign",
    "keep_count",
    "magnitude_threshold",
    "magnitude_thresholds",
    "trim",
    "trim_",
]

Aggregate = Literal["mean", "sum", "max"]
Rescale = Literal["paper", "l1", "off"]

CHUNK = 1 << 16
"""Elements per chunk of fused elementwise loops: small enough to stay in cache."""


def chunk_slices(n: int, size: int = CHUNK) -> list[slice]:
    """Consecutive slices covering ``range(n)``."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


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
    return magnitude_thresholds([delta], [density])[0]


def magnitude_thresholds(deltas: Sequence[Tensor], densities: Sequence[float]) -> list[float]:
    """:func:`magnitude_threshold` of each delta with its density, computed in parallel."""
    out: list[float] = []
    todo: list[tuple[int, int]] = []
    for i, (d, density) in enumerate(zip(deltas, densities, strict=True)):
        k = keep_count(density, d.numel())
        out.append(float("inf") if k == 0 else 0.0)
        if 0 < k < d.numel():
            todo.append((i, k))
    values = kth_largest_each([deltas[i] for i, _ in todo], [k for _, k in todo], magnitude=True)
    for (i, _), v in zip(todo, values, strict=True):
        out[i] = float(v)
    return out


def trim(delta: Tensor, threshold: float) -> Tensor:
    """TIES trim (§2.3 step 1): zero the entries with ``|δ| < threshold``."""
    if threshold <= 0:
        return delta
    if threshold == float("inf"):
        return torch.zeros_like(delta)
    # hardshrink keeps |δ| > λ; λ = the float just below the threshold keeps |δ| ≥ threshold
    t = torch.tensor(threshold, dtype=delta.dtype)
    below = float(torch.nextafter(t, torch.zeros_like(t)))
    return torch.nn.functional.hardshrink(delta, below)


def trim_(delta: Tensor, threshold: float) -> Tensor:
    """In-place :func:`trim` of a whole tensor, chunk by chunk."""
    flat = delta.reshape(-1)
    for s in chunk_slices(flat.numel()):
        flat[s] = trim(flat[s], threshold)
    return delta


def elect_sign(weighted: Sequence[Tensor], zero_sign: float = 1.0) -> Tensor:
    """TIES sign election (§2.3 step 2): ``sign(Σ_t δ_t)``, ``zero_sign`` where the sum is 0.

    ``zero_sign`` = 1 is mergekit's rule (sum ≥ 0 → +); the paper code uses the model-wide
    majority sign there (0 leaves such entries at 0). Float ±1/0, same dtype as the input.
    """
    total = weighted[0].clone()
    for d in weighted[1:]:
        total += d
    sign = total.sign_()
    if zero_sign != 0:
        sign += (1 - sign.abs()) * zero_sign
    return sign


def disjoint_merge(
    weighted: Sequence[Tensor],
    sign: Tensor,
    weights: Sequence[float],
    aggregate: Aggregate = "mean",
) -> Tensor:
    """TIES disjoint merge (§2.3 step 3) of weighted deltas ``w_t·δ_t`` that agree with ``sign``.

    ``mean``: ``Σ_t w_t δ_t [agree] / Σ_t w_t [agree]`` (the paper's dis-mean when all
    ``w_t = 1``; a divisor of 0 counts as 1); ``sum``: the numerator alone; ``max``: the
    largest agreeing ``|w_t δ_t|`` with the elected sign. Zeros never agree.
    """
    # relu(δ·s) is |δ| where δ agrees with s, else 0: float ops only (bool ops are slow on CPU)
    acc = torch.zeros_like(weighted[0])
    den = torch.zeros_like(acc) if aggregate == "mean" else None
    for d, w in zip(weighted, weights, strict=True):
        agreeing = (d * sign).clamp_min_(0)
        if aggregate == "max":
            torch.maximum(acc, agreeing, out=acc)
            continue
        acc += agreeing
        if den is not None:
            den.add_(agreeing.sign_(), alpha=w)
    acc *= sign
    if den is not None:
        den += 1 - den.abs().sign()
        acc /= den
    return acc


def dare_drop_(
    delta: Tensor, p: float, generator: torch.Generator, rescale: Rescale = "paper"
) -> Tensor:
    """DARE (§3.3), in place: drop each entry with probability ``p``, then rescale.

    ``paper``: survivors × 1/(1−p) (unbiased); ``l1``: survivors scaled so ``‖δ‖₁`` is kept
    (mergekit's dare_*, no change when either norm is below 1e-7); ``off``: no rescale
    (DropOnly). The mask is drawn on CPU from ``generator``, chunk by chunk in order, so it
    does not depend on the device. ``p >= 1`` drops everything, without rescale.
    """
    if p <= 0:
        return delta
    flat = delta.reshape(-1)
    before = after = 0.0
    scale = 1.0 / (1.0 - p) if rescale == "paper" and p < 1 else 1.0
    one = torch.ones(())
    for s in chunk_slices(flat.numel(), 1 << 20):
        c = flat[s]
        if rescale == "l1":
            before += float(c.abs().sum(dtype=torch.float64))
        keep = torch.heaviside(torch.rand(c.numel(), generator=generator) - p, one)
        c.mul_(keep.to(c.device, c.dtype)).mul_(scale)
        if rescale == "l1":
            after += float(c.abs().sum(dtype=torch.float64))
    if rescale == "l1" and p < 1 and before >= 1e-7 and after >= 1e-7:
        delta.mul_(before / after)
    return delta
