"""PCB-Merging: parameter competition balancing (spec merging.md §4).

Every entry of every task vector gets its own coefficient from its importance inside its task
(intra-balancing) and its agreement with the other tasks (inter-balancing); the lowest-scoring
entries are dropped and the rest combined as a score-weighted average. As in the authors' code
(``duguodong7/pcb-merging``), the magnitude clip and the drop threshold are quantiles over the
*whole* model per task; splice computes them exactly in streaming passes (radix selection on
fp32 values, never a sort of the model), so PCB runs in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from splice._lazy import lazy_import
from splice.deltas import is_mergeable
from splice.merge.base import GlobalStat, HyperParams, MergeContext, MergeMethod, methods
from splice.merge.engine.stats import CHUNK, RadixSelect
from splice.merge.methods._sparsify import chunk_slices
from splice.merge.methods._vectors import add_scaled

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["PCB", "PCBThresholds", "pcb_balance", "pcb_merge", "pcb_scores"]

InterMode = Literal["pairwise", "normalized", "raw"]


def _unit_range(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Min–max normalisation with per-row bounds; a zero range gives 0 (spec §4.6)."""
    span = hi - lo
    return torch.where(span > 0, (a - lo) / torch.where(span > 0, span, 1.0), 0.0)


def pcb_balance(
    v: Tensor, lo: Tensor, hi: Tensor, inter: InterMode = "pairwise"
) -> tuple[Tensor, Tensor]:
    """Spec §4.3 steps 1–4 on rows ``v`` (T, n) of task-vector entries, fp32.

    ``lo``/``hi`` (T,) are each task's global |τ| clip bounds. Returns ``(V̄, β)``: the clipped
    task vectors and the balancing matrix ``exp(T·Norm(A)²) ⊙ inter``.
    """
    num = v.shape[0]
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    a = torch.minimum(torch.maximum(v.abs(), lo), hi)
    sign = torch.sign(v)
    norm = _unit_range(a, lo, hi)
    intra = torch.exp(num * norm**2)
    if inter == "pairwise":  # pcb_ES.py: Σ_j tanh(Ṽ_t ⊙ Ṽ_j)
        vt = sign * norm
        cross = sum(torch.tanh(vt * vt[j]) for j in range(num))
    elif inter == "normalized":  # vision pcb.py: tanh(V_t ⊙ Σ_j Ṽ_j)
        cross = torch.tanh(v * (sign * norm).sum(0))
    else:  # pcb-merging.py / NLP: tanh(V_t ⊙ Σ_j V_j)
        cross = torch.tanh(v * v.sum(0))
    return sign * a, intra * cross


def pcb_scores(beta: Tensor, q: Tensor, top: Tensor) -> Tensor:
    """Spec §4.3 step 5: ``Norm(Clip(β))`` with per-task drop threshold ``q`` and max ``top``."""
    q, top = q.unsqueeze(1), top.unsqueeze(1)
    return _unit_range(torch.minimum(torch.maximum(beta, q), top), q, top)


def pcb_merge(clipped: Tensor, scores: Tensor, weights: Tensor) -> Tensor:
    """Spec §4.3 step 6: ``Σ_t λ_t V̄_t s_t / max(Σ_t s_t, 1e-12)``."""
    num = (clipped * weights.unsqueeze(1) * scores).sum(0)
    return num / scores.sum(0).clamp(min=1e-12)


def _column_chunks(rows: Tensor) -> list[slice]:
    """Column slices of a (T, n) row stack, each T·width ≤ CHUNK/8 elements, so PCB's ~8
    temporaries stay within one engine chunk; the stat passes and the merge use the same."""
    return chunk_slices(rows.shape[1], max(1, CHUNK // (8 * rows.shape[0])))


def _rows(base: Tensor, tensors: list[Tensor]) -> Tensor:
    b = base.float()
    return torch.stack([(t.float() - b).reshape(-1) for t in tensors])


class PCBThresholds:
    """Per-task global quantiles for PCB (spec §4.3): |τ| clip bounds at sorted indices
    ⌊P·c⌋ and ⌊P(1−c)⌋−1, then β's drop threshold at ⌊P(1−r)⌋ and its maximum. Four passes."""

    key = "pcb"

    def __init__(self, num_models: int, clip: float, ratio: float, inter: InterMode) -> None:
        self.inter = inter

        def select(index: Callable[[int], int], magnitude: bool = False) -> RadixSelect:
            """Selects the element at 0-based ``index(P)`` of the sorted stream of P values."""
            return RadixSelect(lambda p: index(p) + 1, magnitude=magnitude)

        self.clip = [
            (
                select(lambda p: int(p * clip), magnitude=True),
                select(lambda p: int(p * (1 - clip) - 1), magnitude=True),
            )
            for _ in range(num_models)
        ]
        self.drop = [
            (select(lambda p: int(p * (1 - ratio))), select(lambda p: p - 1))
            for _ in range(num_models)
        ]
        self.bounds: tuple[Tensor, Tensor] | None = None

    def observe(
        self, name: str, base: Tensor | None, tensors: list[Tensor], ctx: MergeContext
    ) -> None:
        assert base is not None
        if not is_mergeable(base):
            return
        rows = _rows(base, tensors)
        if self.bounds is None:
            for pair, row in zip(self.clip, rows, strict=True):
                for sel in pair:
                    sel.observe(row)
            return
        lo, hi = (b.to(rows.device) for b in self.bounds)
        for cols in _column_chunks(rows):
            _, beta = pcb_balance(rows[:, cols], lo, hi, self.inter)
            for pair, row in zip(self.drop, beta, strict=True):
                for sel in pair:
                    sel.observe(row)

    def end_pass(self) -> bool:
        pairs = self.clip if self.bounds is None else self.drop
        done = all([sel.end_pass() for pair in pairs for sel in pair])
        if done and self.bounds is None:
            self.bounds = _values(self.clip)
            return False
        return done

    def result(self) -> dict[str, Tensor]:
        assert self.bounds is not None
        q, top = _values(self.drop)
        return {"lo": self.bounds[0], "hi": self.bounds[1], "q": q, "top": top}


def _values(pairs: list[tuple[RadixSelect, RadixSelect]]) -> tuple[Tensor, Tensor]:
    return torch.tensor([a.value for a, _ in pairs]), torch.tensor([b.value for _, b in pairs])


class Params(HyperParams):
    ratio: float = Field(
        0.05, gt=0.0, le=1.0, description="r: fraction of entries kept per task (0.05 for ViT)"
    )
    clip: float = Field(
        0.01, ge=0.0, lt=0.5, description="c: magnitude outlier clip quantile on each side"
    )
    inter: InterMode = Field(
        "pairwise",
        description="inter-balancing: pairwise (pcb_ES.py), normalized (pcb.py), raw (NLP code)",
    )
    lambda_: float = Field(1.0, alias="lambda", description="λ: coefficient of the merged delta")


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="λ_t: per-task coefficient (the ES search's output)")


@methods.register("pcb")
class PCB(MergeMethod):
    """PCB-Merging (Du et al., NeurIPS 2024), spec merging.md §4.

    θ = θ₀ + λ·Σ_t λ_t V̄_t s_t / Σ_t s_t with global (whole-model, per task) clip and drop
    quantiles from :class:`PCBThresholds`.
    """

    name: ClassVar[str] = "pcb"
    pretty_name: ClassVar[str] = "PCB-Merging"
    reference: ClassVar[str] = "https://arxiv.org/abs/2410.02396 (spec merging.md §4)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True

    def scratch_tensors(self, num_models: int) -> float:
        return 2 * num_models + 0.5

    def stat_passes(self, key: str, words: int) -> int:
        return 2 * words  # two radix selections (clip bounds), one pass per word each

    def global_stats(self, params: Params, model_params: list[HyperParams]) -> list[GlobalStat]:
        return [PCBThresholds(len(model_params), params.clip, params.ratio, params.inter)]

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        st = {k: t.to(base.device) for k, t in ctx.stats[PCBThresholds.key].items()}
        v = _rows(base, tensors)
        weights = torch.tensor([mp.weight for mp in model_params], device=v.device)
        for cols in _column_chunks(v):  # scratch O(T·chunk); row 0 takes the result
            clipped, beta = pcb_balance(v[:, cols], st["lo"], st["hi"], params.inter)
            v[0, cols] = pcb_merge(clipped, pcb_scores(beta, st["q"], st["top"]), weights)
        delta = v[0].reshape(base.shape)
        return add_scaled(base, delta, params.lambda_, torch.float32)
