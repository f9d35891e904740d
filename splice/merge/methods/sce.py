"""SCE: select, calculate, erase (FuseChat-2.0, Wan et al., 2024; mergekit's ``sce``).

Per tensor, with task vectors τ_t = θ_t − θ₀: **select** — with ``select_topk`` < 1, keep
only the positions whose variance across the task vectors (population variance) is among the
⌊select_topk · #nonzero-variance⌋ largest, in every τ_t; **calculate** — one scalar weight
per task vector, α_t = mean(τ_t²) / Σ_j mean(τ_j²) (uniform if that sum is below 1e-6);
**erase** — the TIES sign election over Σ_t τ_t (a zero sum counts as +) drops the entries
that disagree. θ = θ₀ + Σ_t α_t m_t τ_t / max(Σ_t α_t m_t, 1e-6). There are no per-model
weights and no λ: the paper's method and mergekit's are the same here. Two things make
mergekit's floats differ: positions tied with the variance cut (splice keeps them all;
mergekit's ``torch.topk`` keeps exactly k, some of the tied ones) and the mean squares
(splice sums them in float64 chunk by chunk; mergekit takes float32 whole-tensor means, ~1e-7
apart). ``mergekit_exact`` (set by mergekit recipes) does both as mergekit does: bit for bit
the same output, ``torch.topk`` called only for tensors whose cut splits a tie. The variance
is torch's in both modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.engine.stats import kth_largest
from splice.merge.methods._sparsify import chunk_slices, elect_sign

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["Sce"]


class Params(HyperParams):
    select_topk: float = Field(
        1.0, ge=0, le=1, description="fraction of highest-variance positions kept"
    )
    mergekit_exact: bool = Field(
        False,
        description="mergekit's floats bit for bit: torch.topk's pick where the variance cut "
        "splits a tie, float32 whole-tensor mean squares (mergekit recipes set it)",
    )


def _variance(chunk: list[Tensor]) -> Tensor:
    """Population variance across ``chunk``, the same floats as ``torch.var(torch.stack(chunk),
    dim=0, unbiased=False)`` (what mergekit calls): torch's CPU kernel is Welford's update in
    float64, rounded once at the end; written out element-wise it runs ~10× faster than the
    strided reduction (tests/merge/methods/test_sce.py checks the bits)."""
    mean = chunk[0].to(torch.float64, copy=True)
    m2 = torch.zeros_like(mean)
    x, d = torch.empty_like(mean), torch.empty_like(mean)
    for n, c in enumerate(chunk[1:], start=2):
        x.copy_(c)
        torch.sub(x, mean, out=d)
        mean += d / n
        m2.addcmul_(d, x.sub_(mean))
    return m2.div_(len(chunk)).to(chunk[0].dtype)


def _select_(taus: list[Tensor], topk: float, exact: bool) -> Tensor | None:
    """Zero, in every task vector, the positions outside the top-variance fraction; return
    a free float buffer of the tensor's size (None if none was needed).

    k = ⌊topk · #nonzero variances⌋ positions are kept, and every position tied with the k-th
    largest variance. ``exact`` keeps exactly k: where the cut splits a tie it asks
    ``torch.topk`` of the whole variance tensor, as mergekit does, which picks the tied
    positions its selection algorithm meets first (the same on the same floats)."""
    flat = [t.reshape(-1) for t in taus]
    if topk <= 0:
        for f in flat:
            f.zero_()
        return None
    var = torch.empty_like(flat[0])
    for s in chunk_slices(var.numel()):
        var[s] = _variance([f[s] for f in flat])
    k = int(int(torch.count_nonzero(var)) * topk)
    if k == 0:
        var.zero_()
    else:
        cut = kth_largest(var, k)
        if exact and int(torch.count_nonzero(var >= cut)) > k:
            top = torch.topk(var.abs(), k=k, largest=True).indices
            var.zero_()[top] = 1
        else:
            var.ge_(cut)  # the 0/1 mask, in place of the variances
    for f in flat:
        f.mul_(var)
    return var


def _weights(taus: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """α_t = mean(τ_t²) / Σ_j mean(τ_j²), sums in float64 chunk by chunk."""
    means = [
        sum(float(f.square().sum(dtype=torch.float64)) for f in t.reshape(-1).split(1 << 20))
        / max(1, t.numel())
        for t in taus
    ]
    total = sum(means)
    alphas = [1.0 / len(taus)] * len(taus) if abs(total) < 1e-6 else [m / total for m in means]
    return [torch.tensor(a, dtype=dtype) for a in alphas]


def _weights_mergekit(taus: list[Tensor], buf: Tensor | None) -> list[Tensor]:
    """mergekit's α_t: float32 whole-tensor means of τ_t² (squares in ``buf``), divided by
    their float32 sum (as a Python float)."""
    if buf is None:
        buf = torch.empty_like(taus[0].reshape(-1))
    means = torch.stack([torch.mul(t, t, out=buf.view_as(t)).mean() for t in taus])
    total = torch.sum(means).item()
    if abs(total) < 1e-6:
        return list(torch.ones_like(means) / means.shape[0])
    return list(means / total)


@methods.register("sce")
class Sce(MergeMethod):
    """Variance selection, mean-square weights, sign erasure (see module docstring)."""

    name: ClassVar[str] = "sce"
    pretty_name: ClassVar[str] = "SCE"
    reference: ClassVar[str] = "https://arxiv.org/abs/2408.07990 (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    delta_only: ClassVar[bool] = True
    throughput: ClassVar[float] = 60e6

    def scratch_tensors(self, num_models: int) -> float:
        return 2.3  # the variance (then the mask); mergekit_exact: torch.topk where tied

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        taus = [t.sub_(base) for t in tensors]
        exact = params.mergekit_exact
        buf = _select_(taus, params.select_topk, exact) if params.select_topk < 1 else None
        alphas = _weights_mergekit(taus, buf) if exact else _weights(taus, base.dtype)
        del buf
        flat, b = [t.reshape(-1) for t in taus], base.reshape(-1)
        for s in chunk_slices(b.numel()):
            chunk = [f[s] for f in flat]
            sign = elect_sign(chunk, 1.0)
            num = torch.zeros_like(sign)
            den = torch.zeros_like(sign)
            for c, a in zip(chunk, alphas, strict=True):
                erased = (c.sign() == sign).to(c.dtype).mul_(a)
                num += c * erased
                den += erased
            flat[0][s] = b[s] + num / den.clamp_(min=1e-6)
        return tensors[0]
