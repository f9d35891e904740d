"""DC-Merge: directional-consistent merging in a shared orthogonal subspace (spec merging.md §8).

Per 2-D weight (and 1×1 convolution): truncate every task vector to its top-``k`` singular
triplets (optionally flattening their spectrum), build one orthonormal basis from all tasks'
singular vectors (polar factor of the stacked bases), project each task into it, keep the
largest core entries, aggregate the cores TIES-style, keep only the task-diagonal blocks and
project back. All other tensors are averaged. Follows the authors' code
(``Tobeginwith/DC-Merge``: FFT ``DC_utils.py``, LoRA ``merging_functions.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from splice._lazy import lazy_import
from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeContext, MergeMethod, NoParams, methods
from splice.merge.methods._lowrank_utils import polar, stack_deltas
from splice.merge.methods._sparsify import disjoint_merge, elect_sign, magnitude_threshold, trim_
from splice.merge.methods._vectors import add_scaled

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["DCMerge", "dc_merge_matrix", "smooth_singular_values"]

Smoothing = Literal["none", "avg", "linear"]


def smooth_singular_values(s: Tensor, mode: Smoothing, rho: float = 5.0) -> Tensor:
    """Spec §8.3 step 2: redistribute the energy ``Σσ`` of the top-``k`` values ``s``.

    ``avg``: flat spectrum; ``linear``: weights ∝ linspace(ρ', 1, k) with ρ' = min(ρ, σ₁/σ_k);
    ``none``: unchanged. Both smoothings preserve ``Σσ``.
    """
    if mode == "none" or s.numel() == 0:
        return s
    k = s.numel()
    if mode == "avg":
        w = torch.full_like(s, 1.0 / k)
    else:
        ratio = rho if s[-1] <= 0 else min(rho, float(s[0] / s[-1]))
        w = torch.linspace(ratio, 1.0, k, dtype=s.dtype, device=s.device)
        w = w / w.sum()
    return s.sum() * w


def _keep_top(x: Tensor, fraction: float) -> Tensor:
    """Keep entries with |x| ≥ the k-th largest |x|, k = max(1, ⌊fraction·n⌋) (ties kept)."""
    return trim_(x.clone(), magnitude_threshold(x, fraction))


def dc_merge_matrix(
    deltas: Tensor,
    *,
    rank: int | None = None,
    smoothing: Smoothing = "none",
    rho: float = 5.0,
    keep: float = 1e-3,
) -> Tensor:
    """Merge the stacked ``(T, m, n)`` task vectors of one matrix (spec §8.3 steps 1–8, no α).

    ``rank=None`` is the full-fine-tune path (k = ⌊min(m,n)/T⌋, bases zero-padded to
    min(m,n) columns); an explicit rank (the LoRA rank) truncates the shared basis to T·rank.

    Raises:
        SpliceError: ``T·rank`` exceeds ``min(m, n)``.
    """
    num, m, n = deltas.shape
    full = min(m, n)
    if rank is None:
        k, width = full // num, full
    else:
        k, width = rank, num * rank
        if width > full:
            raise SpliceError(
                f"dc_merge rank {rank} × {num} models exceeds min(m, n) = {full}",
                where=f"{m}×{n} matrix",
                fix="lower `rank` (the shared basis has at most min(m, n) directions)",
            )
    if k == 0:  # more tasks than directions: nothing to split, fall back to the average [lib]
        return deltas.mean(0)
    u_stack = deltas.new_zeros(m, width)
    v_stack = deltas.new_zeros(width, n)
    truncated = []
    for t in range(num):
        u, s, vh = torch.linalg.svd(deltas[t], full_matrices=False)
        u, s, vh = u[:, :k], smooth_singular_values(s[:k], smoothing, rho), vh[:k]
        u_stack[:, t * k : (t + 1) * k] = u
        v_stack[t * k : (t + 1) * k] = vh
        truncated.append((u, s, vh))
    u_c, vh_c = polar(u_stack), polar(v_stack)  # (m, width), (width, n)
    cores = torch.stack(
        [_keep_top((u_c.T @ u) * s @ (vh @ vh_c.T), keep) for u, s, vh in truncated]
    )
    # spec §8.3 step 6: mean over tasks agreeing with sign(Σ_t M_t); 0 where Σ_t M_t = 0
    agg = disjoint_merge(cores, elect_sign(cores, zero_sign=0.0), [1.0] * num)
    d = width // num
    mask = torch.zeros_like(agg)
    for t in range(num):
        mask[t * d : (t + 1) * d, t * d : (t + 1) * d] = 1
    return u_c @ (agg * mask) @ vh_c


class Params(HyperParams):
    lambda_: float = Field(
        1.0, alias="lambda", description="α: coefficient of the merged delta (paper grid 0.1…3.0)"
    )
    rank: int | None = Field(
        None,
        ge=1,
        description="per-task SVD rank; None = ⌊min(m,n)/T⌋ (full fine-tunes); "
        "the LoRA rank r for adapter inputs",
    )
    smoothing: Smoothing = Field(
        "none", description="singular-value smoothing: none (FFT), avg or linear (LoRA)"
    )
    rho: float = Field(5.0, ge=1.0, description="cap on σ₁/σ_k for `linear` smoothing")
    keep: float = Field(
        1e-3, gt=0.0, le=1.0, description="fraction of each task's core entries kept"
    )


@methods.register("dc_merge")
class DCMerge(MergeMethod):
    """DC-Merge (Zhang et al., CVPR 2026), spec merging.md §8.

    θ = θ₀ + α·Δ, Δ from :func:`dc_merge_matrix` for 2-D tensors and 1×1 convolutions (a
    pointwise conv is a matrix, and the paper's LoRA setting merges every LoRA-adapted matrix)
    and the task-vector mean for the rest (biases, norms, k×k kernels).
    For LoRA inputs set ``rank`` to the adapter rank and ``smoothing: avg`` (the paper's LoRA
    setting); LoRA scaling α/r is already in the materialized ΔW (spec §8.6).
    """

    name: ClassVar[str] = "dc_merge"
    pretty_name: ClassVar[str] = "DC-Merge"
    reference: ClassVar[str] = "https://arxiv.org/abs/2603.06242 (spec merging.md §8)"
    Params: ClassVar[type[HyperParams]] = Params
    delta_only: ClassVar[bool] = True
    uses_svd: ClassVar[bool] = True

    def scratch_tensors(self, num_models: int) -> float:
        return 3 * num_models + 3

    ModelParams: ClassVar[type[HyperParams]] = NoParams

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        deltas = stack_deltas(base, tensors)
        if base.ndim == 2 or (base.ndim == 4 and base.shape[2:] == (1, 1)):
            delta = dc_merge_matrix(
                deltas.flatten(2),
                rank=params.rank,
                smoothing=params.smoothing,
                rho=params.rho,
                keep=params.keep,
            ).reshape(base.shape)
        else:
            delta = deltas.mean(0)
        return add_scaled(base, delta, params.lambda_)
