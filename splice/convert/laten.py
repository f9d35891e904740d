"""LaTen — Locate-Then-Align pre-aligned parametric knowledge transfer (spec other.md §5.3).

Given attribution scores of a teacher and a (smaller, same-tokenizer) student on one example
(:func:`splice.convert.attribution.attribute`):

- Locate: the teacher's top-N layers (N = the student's depth) pair, in order, with the
  student's layers; per pair the top ``⌊τ·d_ff_s⌋`` FFN neurons and ``⌊τ·d_model_s⌋``
  attention dims of each model (counts follow the student's sizes).
- Extract: teacher rows of ``up_proj`` and columns of ``down_proj``/``o_proj`` at its
  located indices, hidden axis last (``(K, d_teacher)``).
- Align: one hypernetwork per module type, ``f(u) = W₂ ReLU(W₁ u)`` without biases, weights
  ``N(0, init_std²)``, maps each slice to ``(K, d_student)``.
- Inject: ΔW at the student's own located rows/columns (:mod:`splice.convert.slicer`); the
  student is frozen, only the hypernetworks train, on ``L_LM + λ · Σ_m MSE(ΔW_m, 0)``
  (:meth:`LaTen.loss`; driven by :func:`splice.train.loop.fit`).

``v_proj`` (a spec target) is left out: with grouped-query attention (SmolLM2) its rows are
key-value dims, not the attention dims located at ``o_proj``. [recon] where the spec is
silent: layers ranked by ``attention + ffn`` score.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from splice.convert.attribution import Attribution, top_layers
from splice.convert.slicer import SliceDelta, attach_slices, merge_slices
from splice.errors import SpliceError

__all__ = ["Hypernetwork", "LaTen", "check_same_tokenizer"]

# module type → (path inside a layer, axis of the student slice, which scores locate it)
MODULES = {
    "up": ("mlp.up_proj", "rows", "neurons"),
    "down": ("mlp.down_proj", "cols", "neurons"),
    "o": ("self_attn.o_proj", "cols", "attention_dims"),
}


def check_same_tokenizer(teacher: Any, student: Any) -> None:
    """Raise unless the two tokenizers have the same vocabulary (token → id)."""
    a, b = teacher.get_vocab(), student.get_vocab()
    if a != b:
        diff = len(set(a.items()) ^ set(b.items()))
        raise SpliceError(
            f"teacher and student tokenizers differ (vocab sizes {len(a)} vs {len(b)}, "
            f"{diff} differing entries)",
            fix="transfer between models of one family that share a tokenizer",
        )


class Hypernetwork(nn.Module):
    """``f(u) = W₂ ReLU(W₁ u)`` along the hidden axis: ``d_teacher → d_student``."""

    def __init__(self, d_teacher: int, d_student: int, init_std: float = 1e-5) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_teacher, d_teacher) * init_std)
        self.w2 = nn.Parameter(torch.randn(d_student, d_teacher) * init_std)

    def forward(self, u: Tensor) -> Tensor:
        return torch.relu(u @ self.w1.T) @ self.w2.T


class LaTen(nn.Module):
    """The located teacher slices (buffers), the hypernetworks and the student slice plan."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_scores: Attribution,
        student_scores: Attribution,
        rate: float = 0.1,
        init_std: float = 1e-5,
    ) -> None:
        super().__init__()
        t_layers, s_layers = teacher.model.layers, student.model.layers
        if len(t_layers) < len(s_layers):
            raise SpliceError(
                f"the teacher has fewer layers ({len(t_layers)}) than the student "
                f"({len(s_layers)})",
                fix="transfer from the larger model",
            )
        d_t, d_s = teacher.config.hidden_size, student.config.hidden_size
        counts = {
            "neurons": math.floor(rate * student.config.intermediate_size),
            "attention_dims": math.floor(rate * d_s),
        }
        self.hyper = nn.ModuleDict({m: Hypernetwork(d_t, d_s, init_std) for m in MODULES})
        self.plan: list[tuple[str, str, str, Tensor]] = []  # (type, student module, axis, idx)
        pairs = zip(top_layers(teacher_scores, len(s_layers)), range(len(s_layers)), strict=True)
        for t, s in pairs:
            for kind, (path, axis, scores) in MODULES.items():
                k = counts[scores]
                t_idx = getattr(teacher_scores, scores)[t].topk(k).indices
                s_idx = getattr(student_scores, scores)[s].topk(k).indices
                w = teacher.get_submodule(f"model.layers.{t}.{path}").weight.detach().float()
                sliced = w[t_idx] if axis == "rows" else w[:, t_idx].T  # (K, d_teacher)
                name = f"slice_{len(self.plan)}"
                self.register_buffer(name, sliced.clone())
                self.plan.append((kind, f"model.layers.{s}.{path}", axis, s_idx))
        self.slices = [
            SliceDelta(module, axis, idx, self._values(i, kind, axis))
            for i, (kind, module, axis, idx) in enumerate(self.plan)
        ]
        self._numel = {m: 0 for m in MODULES}
        for kind, module, _, _ in self.plan:
            self._numel[kind] += student.get_submodule(module).weight.numel()

    def _values(self, i: int, kind: str, axis: str):
        def values() -> Tensor:
            out = self.hyper[kind](getattr(self, f"slice_{i}"))  # (K, d_student)
            return out if axis == "rows" else out.T

        return values

    def attach(self, student: nn.Module) -> None:
        """Hook ΔW into the student (frozen): its forward now includes the transfer."""
        student.requires_grad_(False)
        attach_slices(student, self.slices)

    def merge(self, student: nn.Module) -> None:
        """Write ΔW into the student's weights and unhook (save keeps the transfer)."""
        merge_slices(student, self.slices)

    def penalty(self) -> Tensor:
        """``Σ_m MSE(ΔW_m, 0)`` over module types (ΔW_m: all of its layers' dense deltas)."""
        sums = {m: 0.0 for m in MODULES}
        for s, (kind, *_) in zip(self.slices, self.plan, strict=True):
            sums[kind] = sums[kind] + s.values().float().pow(2).sum()
        return sum(sums[m] / max(self._numel[m], 1) for m in MODULES)

    def loss(self, student: nn.Module, batch: dict[str, Tensor], weight: float = 1000.0):
        """``L_LM(student + ΔW) + weight · penalty`` on one batch (``labels`` included)."""
        return student(**batch).loss + weight * self.penalty()
