"""T-Switch / Auto-Switch: task vectors as binary switches plus one scale (spec merging.md §12).

As the official code (``lfy-123/Binary-Task-Switch``, Errata of §12): per task and per named
tensor, the positive and the negative entries of τ are trimmed **separately**, each sign keeping
its ⌊keep·n_±⌋ largest-magnitude non-zero entries (ties at the threshold kept; a sign with
⌊keep·n_±⌋ = 0 stays untrimmed, as in the code); then τ̂ = κ·M⊙sign(τ) with
κ = ‖τ_kept‖₂ / ‖sign(τ_kept)‖₂, the RMS of the kept entries (L2-norm matching). A 0-dim
parameter therefore stays exact (its one entry is kept, κ = |τ|). Default keep 0.4 (the
paper's ViT full fine-tunes; 0.6 for LoRA, 0.3 for RoBERTa).

The paper evaluates **per-task switching** — θ₀ + τ̂_t with the task's own switch —
(:func:`compose` with one switch set) and **Auto-Switch** (:class:`AutoSwitch`): a k-NN (k = 10)
over pretrained-encoder features of 100 training samples per task, its per-sample task
probabilities averaged over each test batch, one model composed per batch. The registered
``tswitch`` merge method — one static model θ₀ + λ Σ_t w_t τ̂_t — is **splice's own
construct**, not in the paper. :class:`splice.deltas.Switch` stores a switch bit-packed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.deltas import Delta, Switch, is_mergeable, task_vector
from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.engine.stats import kth_largest, kth_smallest
from splice.merge.methods._sparsify import chunk_slices

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = [
    "AutoSwitch",
    "TSwitch",
    "auto_switch_weights",
    "compose",
    "compress",
    "switch_approx",
    "switch_approx_",
    "switch_delta",
    "switch_parts",
    "tswitch_compose",
    "tswitch_compress",
]

KEEP = 0.4
"""Default fraction of each sign's non-zero entries a switch keeps (ViT full fine-tunes)."""


def _check_keep(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise SpliceError(f"density {density} is outside (0, 1]", fix=f"e.g. density={KEEP}")


def _thresholds(flat: Tensor, density: float) -> tuple[float, float]:
    """``(t₊, t₋)``: the smallest kept positive entry and the smallest kept ``|negative|``
    (0 keeps the whole sign), found by radix selection (chunk-sized scratch)."""
    n_pos = n_neg = 0
    for s in chunk_slices(flat.numel()):
        c = flat[s]
        n_pos += int((c > 0).sum())
        n_neg += int((c < 0).sum())
    k_pos, k_neg = int(density * n_pos), int(density * n_neg)
    # the k-th largest entry overall is the k-th largest positive one while k ≤ n₊
    t_pos = float(kth_largest(flat, k_pos)) if k_pos else 0.0
    t_neg = -float(kth_smallest(flat, k_neg)) if k_neg else 0.0
    return t_pos, t_neg


def _kept(c: Tensor, t_pos: float, t_neg: float) -> Tensor:
    pos = c >= t_pos if t_pos > 0 else c > 0
    neg = c <= -t_neg if t_neg > 0 else c < 0
    return pos.logical_or_(neg)


def _scale(flat: Tensor, t_pos: float, t_neg: float) -> float:
    """κ = RMS of the kept entries (0 when none is kept)."""
    squares, count = 0.0, 0
    for s in chunk_slices(flat.numel()):
        c = flat[s]
        keep = _kept(c, t_pos, t_neg)
        squares += float(torch.where(keep, c, 0).double().square().sum())
        count += int(keep.sum())
    return math.sqrt(squares / count) if count else 0.0


def switch_parts(tau: Tensor, density: float = KEEP) -> tuple[Tensor, Tensor]:
    """``(M, κ)`` for one task vector: the bool mask of kept entries and κ as an fp32 scalar
    (see the module docstring for the rule)."""
    flat = tau.detach().reshape(-1)
    t_pos, t_neg = _thresholds(flat, density)
    return _kept(flat, t_pos, t_neg).reshape(tau.shape), torch.tensor(_scale(flat, t_pos, t_neg))


def switch_approx_(tau: Tensor, density: float = KEEP) -> Tensor:
    """τ → τ̂ = κ·M⊙sign(τ) in place, chunk by chunk (scratch: a few chunks)."""
    flat = tau.reshape(-1)
    t_pos, t_neg = _thresholds(flat, density)
    kappa = _scale(flat, t_pos, t_neg)
    for s in chunk_slices(flat.numel()):
        c = flat[s]
        c.copy_(torch.where(_kept(c, t_pos, t_neg), c.sign().mul_(kappa), 0))
    return tau


def switch_approx(tau: Tensor, density: float = KEEP) -> Tensor:
    """τ̂ = κ·M⊙sign(τ) as a new fp32 tensor, without packing (same device as τ)."""
    return switch_approx_(tau.float().clone(), density)


def switch_delta(tau: Tensor, density: float = KEEP) -> Switch:
    """One task vector as a stored :class:`~splice.deltas.Switch` (see :func:`switch_parts`)."""
    keep, scale = switch_parts(tau.detach().reshape(-1).float().cpu(), density)
    return Switch.pack(tau, keep, scale)


def compress(
    base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], *, density: float = KEEP
) -> dict[str, Switch]:
    """One task's switches, streamed tensor by tensor; save with ``save_deltas``."""
    _check_keep(density)
    return {name: switch_delta(d.value, density) for name, d in task_vector(base, tuned)}


def compose(
    base: Mapping[str, Tensor],
    switches: Sequence[Mapping[str, Delta]],
    weights: Sequence[float],
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, θ₀ + Σ_t w_t τ̂_t)`` in base order; int/bool buffers pass through.

    ``switches[t]`` is task t's deltas (e.g. from ``load_deltas``); a task without a delta for
    a tensor contributes nothing to it. Per-task switching (the paper's T-Switch) is
    ``compose(base, [switches[t]], [1.0])``; Auto-Switch passes
    :meth:`AutoSwitch.batch_weights` of each test batch.
    """
    if len(switches) != len(weights):
        raise SpliceError(f"{len(switches)} switch sets but {len(weights)} weights")
    for name in base:
        theta = base[name]
        if is_mergeable(theta):
            out = theta.float()
            for deltas, w in zip(switches, weights, strict=True):
                if name in deltas and w != 0:
                    out = out + float(w) * deltas[name].materialize(torch.float32)
            theta = out.to(theta.dtype)
        yield name, theta


tswitch_compress = compress
tswitch_compose = compose


def auto_switch_weights(
    bank: Tensor, bank_tasks: Tensor, queries: Tensor, *, k: int = 10, num_tasks: int | None = None
) -> Tensor:
    """Per-query task probabilities of a k-NN classifier over the feature bank (uniform
    weights, Euclidean: scikit-learn's ``KNeighborsClassifier.predict_proba``, as the official
    code uses): the fraction of the ``k`` nearest bank rows that belong to each task.

    ``bank`` (N, d) and ``queries`` (B, d) are features from the pretrained encoder;
    ``bank_tasks`` (N,) holds task ids 0..T-1. Equal distances go to the earlier bank row.
    Returns (B, T) rows summing to 1.
    """
    if bank.shape[0] != bank_tasks.shape[0] or not 1 <= k <= bank.shape[0]:
        raise SpliceError(
            f"need 1 ≤ k ≤ bank size and one task id per bank row "
            f"(k={k}, bank {tuple(bank.shape)}, ids {tuple(bank_tasks.shape)})"
        )
    num_tasks = num_tasks or int(bank_tasks.max()) + 1
    dist = torch.cdist(queries.double(), bank.double())
    nearest = dist.argsort(dim=1, stable=True)[:, :k]
    votes = torch.nn.functional.one_hot(bank_tasks.long()[nearest], num_tasks)
    return votes.double().mean(1).to(torch.float32)


class AutoSwitch:
    """Auto-Switch's task weights (paper's evaluation, official code): a k-NN over a bank of
    pretrained-encoder features, the first ``samples`` training examples of each task.

    ``AutoSwitch(features)`` with ``features[t]`` the (n_t, d) features of task t's training
    examples; :meth:`batch_weights` gives one weight per task for a test batch, to compose
    that batch's model with :func:`compose`.
    """

    def __init__(self, features: Sequence[Tensor], *, samples: int = 100, k: int = 10) -> None:
        if not features or any(f.ndim != 2 or f.shape[0] == 0 for f in features):
            raise SpliceError("Auto-Switch needs a non-empty (n, d) feature matrix per task")
        rows = [f[:samples] for f in features]
        self.bank = torch.cat(rows).float()
        self.tasks = torch.cat([torch.full((len(r),), t) for t, r in enumerate(rows)])
        self.k = k
        self.num_tasks = len(features)

    def proba(self, queries: Tensor) -> Tensor:
        """(B, T) task probabilities of each query (:func:`auto_switch_weights`)."""
        return auto_switch_weights(
            self.bank, self.tasks, queries, k=self.k, num_tasks=self.num_tasks
        )

    def batch_weights(self, batch: Tensor) -> Tensor:
        """(T,) the probabilities averaged over the batch's rows: the weights of its model."""
        return self.proba(batch).double().mean(0).to(torch.float32)


class Params(HyperParams):
    density: float = Field(
        KEEP, gt=0.0, le=1.0, description="fraction of each sign's non-zero τ entries kept"
    )
    lambda_: float = Field(1.0, alias="lambda", description="λ: coefficient of the sum")


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="λ_t: this task's coefficient")


@methods.register("tswitch")
class TSwitch(MergeMethod):
    """Static sum of T-Switch switches, θ = θ₀ + λ Σ_t w_t τ̂_t: splice's own construct.

    The paper (Qi et al., CVPR 2025, spec merging.md §12) switches per task or per batch
    (:func:`compose`, :class:`AutoSwitch`); it has no static merge. τ̂_t is the paper's switch
    (module docstring), computed in the compute dtype.
    """

    name: ClassVar[str] = "tswitch"
    pretty_name: ClassVar[str] = "T-Switch static sum (splice's construct; paper: per task)"
    reference: ClassVar[str] = "https://arxiv.org/abs/2412.00054 (spec merging.md §12)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True

    def scratch_tensors(self, num_models: int) -> float:
        return 0.2

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        out = None
        for t, mp in zip(tensors, model_params, strict=True):
            tau_hat = switch_approx_(t.sub_(base), params.density)
            tau_hat.mul_(params.lambda_ * mp.weight)
            out = tau_hat if out is None else out.add_(tau_hat)
        assert out is not None
        return out.add_(base)
