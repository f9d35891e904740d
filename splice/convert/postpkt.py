"""PostPKT — post-aligned parametric knowledge transfer (spec other.md §5.2; "Seeking Neural
Nuggets"): extract → SVD → LoRA → fine-tune.

- Extract: per paired layer and target linear, the teacher weight's rows and columns with
  the largest summed sensitivity ``|θ ⊙ ∇L|`` (:func:`splice.convert.attribution.sensitivity`),
  as many as the student's linear has, kept in their original order: a slice of the
  student's shape.
- SVD → LoRA: the slice's best rank-r factors ``B A`` (:func:`splice.convert.svd_relax`).
- Inject: ``W_s + B A`` where ``B, A`` are trainable (the student's weights stay frozen);
  fine-tuning them is the ordinary training loop's job; :func:`merge_postpkt` then writes
  ``B A`` into the weights and puts the plain linears back (a saved student keeps it).
  [recon] the spec's formula ``Θ_s − ΔΘ + BA`` is read as: the extracted ΔΘ is replaced
  by its trainable low-rank factors, which on top of the unchanged student is ``W_s + BA``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from splice.convert.recursive import svd_relax
from splice.errors import SpliceError

__all__ = ["LowRankDelta", "extract_slice", "inject_postpkt", "merge_postpkt"]


def extract_slice(weight: Tensor, score: Tensor, shape: tuple[int, int]) -> Tensor:
    """The ``shape`` sub-matrix of ``weight`` on its top-scoring rows and columns."""
    rows, cols = shape
    if rows > weight.shape[0] or cols > weight.shape[1]:
        raise SpliceError(
            f"the student's linear {tuple(shape)} is larger than the teacher's "
            f"{tuple(weight.shape)}",
            fix="transfer from the larger model",
        )
    r = score.sum(1).topk(rows).indices.sort().values
    c = score.sum(0).topk(cols).indices.sort().values
    return weight[r][:, c]


class LowRankDelta(nn.Module):
    """Wraps a frozen linear: ``y = x Wᵀ + (x Aᵀ) Bᵀ`` with trainable ``A``, ``B``."""

    def __init__(self, base: nn.Linear, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(a.clone())
        self.lora_B = nn.Parameter(b.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with ``B A`` added to its weight (for saving)."""
        self.base.weight += (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def inject_postpkt(
    teacher: nn.Module,
    student: nn.Module,
    scores: dict[str, Tensor],
    pairs: list[tuple[int, int]],
    targets: tuple[str, ...] = ("mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"),
    rank: int = 16,
) -> list[str]:
    """Replace each paired student linear with a :class:`LowRankDelta` initialised from the
    teacher's extracted slice; ``scores`` maps teacher parameter names to sensitivities.
    Returns the replaced module names. Everything else in the student is frozen."""
    student.requires_grad_(False)
    done = []
    for t, s in pairs:
        for path in targets:
            t_name, s_name = f"model.layers.{t}.{path}", f"model.layers.{s}.{path}"
            w_t = teacher.get_submodule(t_name).weight.detach().float()
            base = student.get_submodule(s_name)
            delta = extract_slice(w_t, scores[f"{t_name}.weight"], tuple(base.weight.shape))
            if rank > min(delta.shape):
                raise SpliceError(f"rank {rank} is above min(d_in, d_out) = {min(delta.shape)}")
            a, b = svd_relax(delta, rank)
            parent, _, leaf = s_name.rpartition(".")
            setattr(student.get_submodule(parent), leaf, LowRankDelta(base, a, b))
            done.append(s_name)
    return done


def merge_postpkt(student: nn.Module) -> list[str]:
    """Replace every :class:`LowRankDelta` of ``student`` by its base linear with ``B A``
    added to the weight; returns the merged module names (the model saves as its own class)."""
    names = [n for n, m in student.named_modules() if isinstance(m, LowRankDelta)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = student.get_submodule(parent) if parent else student
        setattr(owner, leaf, student.get_submodule(name).merged())
    return names
