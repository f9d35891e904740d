"""DO-Merging: decouple magnitude and direction, orthogonalize directions (spec merging.md §7).

**Reconstructed** [unverified]: no official code; the spec's structure follows the abstract and
one third-party summary. Per matrix, each task's ΔW_t is factored ``B_t A_t`` (balanced SVD
factors, rank = the numerical rank or ``rank``); a data-free gradient descent perturbs the
factors so that different tasks' row spaces of ``A`` and column spaces of ``B`` overlap less,
staying close to the originals; then row magnitudes and unit row directions are merged
separately (mean magnitude, summed direction) and recombined.

Choices the spec leaves open, marked [lib]: squared Frobenius overlap, factors normalised to unit
Frobenius norm during the descent (so ``gamma`` and the step size are scale-free), plain
gradient descent with step ``1/(4(T−1)+2γ)``, magnitudes from the *unperturbed* ΔW_t (the
abstract applies the orthogonalization to the direction components), DoRA's axis (one norm per
output row), 1-D tensors decoupled as one vector without orthogonalization.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeContext, MergeMethod, NoParams, methods
from splice.merge.methods._lowrank_utils import safe_unit_rows, stack_deltas
from splice.merge.methods._vectors import add_scaled

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = [
    "MAX_FACTOR_ROWS",
    "DOMerge",
    "balanced_factors",
    "do_merge_matrix",
    "orthogonalize",
    "overlap",
]

MAX_FACTOR_ROWS = 1024
"""Largest Σ_t rank_t the descent accepts: its Gram matrix is (Σ_t rank_t)² per step."""


def balanced_factors(delta: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A`` = the rank-``rank`` SVD truncation of ``delta``.

    ``B = U√Σ`` (m×r), ``A = √Σ Vᵀ`` (r×n); ``rank=None`` keeps the numerical rank
    (σ > σ₁·max(m,n)·eps), which is the LoRA rank for a materialized adapter.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rank is None:
        rank = int((s > s[0] * max(delta.shape) * torch.finfo(s.dtype).eps).sum())
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def overlap(factors: list[Tensor]) -> Tensor:
    """Σ_{i≠j} ‖X_i X_jᵀ‖_F² over row factors ``X_t`` (r_t × n): cross-task row-space overlap."""
    rows = torch.cat(factors)
    gram = rows @ rows.T
    return (gram.square() * _off_diagonal_blocks(factors, gram)).sum()


def _off_diagonal_blocks(factors: list[Tensor], like: Tensor) -> Tensor:
    mask = torch.ones_like(like)
    start = 0
    for f in factors:
        mask[start : start + f.shape[0], start : start + f.shape[0]] = 0
        start += f.shape[0]
    return mask


def orthogonalize(factors: list[Tensor], *, steps: int = 200, gamma: float = 1.0) -> list[Tensor]:
    """Spec §7.3 step 1 for one factor family (``A``'s rows; pass ``Bᵀ`` for ``B``).

    Minimises ``Σ_{i≠j}‖X̂_i X̂_jᵀ‖_F² + γ Σ_t ‖δ_t‖_F²`` over ``X̂_t = x_t + δ_t`` with
    ``x_t = X_t/‖X_t‖_F`` by gradient descent from δ = 0, and returns ``X̂_t·‖X_t‖_F``.
    """
    norms = [f.norm() for f in factors]
    keep = [i for i, nrm in enumerate(norms) if nrm > 0 and factors[i].numel()]
    if len(keep) < 2 or steps == 0:
        return list(factors)
    x0 = torch.cat([factors[i] / norms[i] for i in keep])
    mask = _off_diagonal_blocks([factors[i] for i in keep], x0 @ x0.T)
    step = 1.0 / (4 * (len(keep) - 1) + 2 * gamma)
    x = x0.clone()
    for _ in range(steps):
        grad = 4 * ((x @ x.T) * mask) @ x + 2 * gamma * (x - x0)
        x = x - step * grad
    out = list(factors)
    start = 0
    for i in keep:
        r = factors[i].shape[0]
        out[i] = x[start : start + r] * norms[i]
        start += r
    return out


def do_merge_matrix(
    deltas: Tensor, *, rank: int | None = None, steps: int = 200, gamma: float = 1.0
) -> Tensor:
    """Merge stacked ``(T, m, n)`` task vectors of one matrix (spec §7.3 steps 1–4, no λ).

    Raises:
        SpliceError: with ``steps > 0``, the factors have more than ``MAX_FACTOR_ROWS`` rows
            in all (full-rank deltas of full fine-tunes: set ``rank``).
    """
    factors = [balanced_factors(d, rank) for d in deltas]
    total = sum(a.shape[0] for _, a in factors)
    if steps and total > MAX_FACTOR_ROWS:
        raise SpliceError(
            f"do_merge: the {deltas.shape[1]}×{deltas.shape[2]} deltas have rank "
            f"{total // len(factors)} on average, too high to orthogonalize",
            fix="DO-Merging targets low-rank (LoRA) deltas: set `rank` (e.g. 16) to factor "
            "full fine-tunes at that rank, or `steps: 0`",
        )
    b_hat = orthogonalize([b.T for b, _ in factors], steps=steps, gamma=gamma)
    a_hat = orthogonalize([a for _, a in factors], steps=steps, gamma=gamma)
    directions = []
    magnitudes = []
    for delta, bt, a in zip(deltas, b_hat, a_hat, strict=True):
        magnitudes.append(torch.linalg.vector_norm(delta, dim=1))
        directions.append(safe_unit_rows(bt.T @ a)[1])
    direction = safe_unit_rows(torch.stack(directions).sum(0))[1]
    return torch.stack(magnitudes).mean(0).unsqueeze(1) * direction


class Params(HyperParams):
    lambda_: float = Field(1.0, alias="lambda", description="λ: coefficient of the merged delta")
    rank: int | None = Field(
        None, ge=1, description="factor rank per task; None = numerical rank (the LoRA rank)"
    )
    steps: int = Field(200, ge=0, description="gradient steps of the orthogonalization (0 = off)")
    gamma: float = Field(
        1.0, gt=0.0, description="proximity weight: larger keeps factors closer to the originals"
    )


@methods.register("do_merge")
class DOMerge(MergeMethod):
    """DO-Merging (Zheng et al., arXiv 2505.15875), spec merging.md §7 — reconstructed.

    θ = θ₀ + λ·m ⊙ D/‖D‖ per output row, with m the mean task row norm and D the sum of the
    tasks' unit row directions after orthogonalization. Tensors of 3+ dims are treated as
    (out, rest); 1-D tensors as one vector.
    """

    name: ClassVar[str] = "do_merge"
    pretty_name: ClassVar[str] = "DO-Merging"
    reference: ClassVar[str] = "https://arxiv.org/abs/2505.15875 (spec merging.md §7)"
    Params: ClassVar[type[HyperParams]] = Params
    delta_only: ClassVar[bool] = True
    uses_svd: ClassVar[bool] = True

    def scratch_tensors(self, num_models: int) -> float:
        return 2 * num_models + 3.3

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
        num = deltas.shape[0]
        if base.ndim >= 2:
            flat = deltas.reshape(num, base.shape[0], -1)
            delta = do_merge_matrix(flat, rank=params.rank, steps=params.steps, gamma=params.gamma)
        else:
            delta = do_merge_matrix(deltas.reshape(num, 1, -1), rank=1, steps=0)
        delta = delta.reshape(base.shape)
        return add_scaled(base, delta, params.lambda_)
