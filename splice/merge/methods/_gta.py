"""mergekit's "generalized task arithmetic" tail, shared by breadcrumbs and DELLA.

After each task vector τ_t has been sparsified (in place, one tensor at a time), the weighted
vectors w_t·τ̃_t are combined chunk by chunk: with ``consensus`` the TIES sign election and
the agreeing-weights divisor, otherwise the plain sum and Σ w_t; ``normalize`` divides by the
divisor, then λ scales and the base is added. The element-wise order of operations is
mergekit's (``GeneralizedTaskArithmeticMerge``), so a deterministic sparsification gives the
same floats. Also the whole-tensor L1 rescale mergekit applies after a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from splice._lazy import lazy_import
from splice.merge.methods._sparsify import chunk_slices, disjoint_merge, elect_sign

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["combine_into", "l1_norm", "l1_rescale_", "sparsify_and_combine"]


def l1_norm(x: Tensor) -> float:
    """``‖x‖₁`` accumulated in float64 chunk by chunk (no full-size temporary)."""
    flat = x.reshape(-1)
    return sum(
        float(flat[s].abs().sum(dtype=torch.float64)) for s in chunk_slices(flat.numel(), 1 << 20)
    )


def l1_rescale_(masked: Tensor, before: float, eps: float = 1e-7) -> Tensor:
    """Scale ``masked`` so its L1 norm is ``before`` (mergekit's ``RescaleNorm.l1``); no change
    when either norm is below ``eps``."""
    after = l1_norm(masked)
    if before >= eps and after >= eps:
        masked.mul_(before / after)
    return masked


def combine_into(
    out: Tensor,
    base: Tensor,
    deltas: list[Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> Tensor:
    """``out = θ₀ + λ·mix(w_t·δ_t)`` (see module docstring); ``out`` may be one of ``deltas``
    (each chunk is read before it is written)."""
    flat = [d.reshape(-1) for d in deltas]
    o, b = out.reshape(-1), base.reshape(-1)
    total = float(torch.tensor(weights, dtype=base.dtype).sum())  # mergekit sums in the dtype
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    for s in chunk_slices(b.numel()):
        wd = [d[s] * w for d, w in zip(flat, weights, strict=True)]
        if consensus:
            aggregate = "mean" if normalize else "sum"
            mixed = disjoint_merge(wd, elect_sign(wd, 1.0), weights, aggregate)
        else:
            mixed = wd[0]
            for d in wd[1:]:
                mixed += d
            if normalize:
                mixed /= divisor
        if lam != 1:
            mixed *= lam
        o[s] = b[s] + mixed
    return out


def sparsify_and_combine(
    base: Tensor,
    tensors: list[Tensor],
    params: Any,
    model_params: list[Any],
    sparsify_: Callable[[Tensor, Any], object],
) -> Tensor:
    """Turn each input into its task vector, sparsify it in place (``sparsify_(τ, its
    per-model params)``), then :func:`combine_into` with ``params.consensus`` (``"ties"`` or
    None), ``params.normalize``, ``params.lambda_`` and the per-model ``weight``."""
    for t, mp in zip(tensors, model_params, strict=True):
        sparsify_(t.sub_(base), mp)
    return combine_into(
        tensors[0],
        base,
        tensors,
        [mp.weight for mp in model_params],
        consensus=params.consensus == "ties",
        normalize=params.normalize,
        lam=params.lambda_,
    )
