"""Polyhistor and Polyhistor-Lite: multi-task adapters from hypernetworks (peft.md §19).

Liu et al., NeurIPS 2022. Every block of the frozen hierarchical backbone gets a bottleneck
adapter ``h ← h + Up(GELU(Down(h)))`` whose weights are *generated* per (task, layer):

- **Decomposed hypernetworks** (:class:`Polyhistor`). ``z = [task emb; layer emb]`` goes
  through a shared trunk (linear, GELU); per stage width, a pair of linear heads emits low-rank
  factors whose product is the weight, ``W_down(z) = H_L(z) H_R(z)ᵀ`` with ``H_L ∈ ℝ^{d×k}``,
  ``H_R ∈ ℝ^{r×k}``, and likewise ``W_up``. Trunk, heads and embeddings are shared by all
  tasks and layers. [recon] of shapes: the paper's exact factor shapes are unconfirmed; one
  head pair per stage width is our reading of "shared across layers" for a backbone whose
  width changes.
- **Layer-wise scaling kernels** (:func:`kron_expand`): a template ``W_tmpl ∈ ℝ^{d₀×r₀}``
  sized for the first stage and a per-layer kernel ``S_ℓ ∈ ℝ^{(d_ℓ/d₀)×(r_ℓ/r₀)}`` give
  ``W_ℓ = S_ℓ ⊗ W_tmpl`` (Kronecker ordering [recon]: kernel outside, template inside).
- **Polyhistor-Lite** (:class:`PolyhistorLite`): the decomposed hypernetworks emit only the
  task-conditioned templates; task-shared scaling kernels expand them to each layer.

``W_up`` starts at zero (the ``H_L`` head of ``Up`` is zero-initialised, its partner is not,
so gradients reach it): the adapted model starts as the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.domains.backbones.hier import BlockHook, HierBackbone
from splice.domains.dense import DENSE_TASKS, MultiTask, freeze
from splice.errors import SpliceError

__all__ = ["DecomposedHyper", "Polyhistor", "PolyhistorLite", "kron_expand", "scaling_shape"]


def kron_expand(template: Tensor, kernel: Tensor) -> Tensor:
    """``kernel ⊗ template``: entry ``[i·d₀ + p, j·r₀ + q] = kernel[i, j] · template[p, q]``."""
    return torch.kron(kernel, template)


def scaling_shape(d: int, r: int, d0: int, r0: int) -> tuple[int, int]:
    """The scaling kernel's shape ``(d/d₀, r/r₀)`` that expands a ``d₀×r₀`` template to ``d×r``.

    Raises:
        SpliceError: ``d₀`` does not divide ``d`` or ``r₀`` does not divide ``r``.
    """
    for name, big, small in (("width", d, d0), ("bottleneck", r, r0)):
        if small <= 0 or big % small:
            raise SpliceError(
                f"Kronecker scaling: template {name} {small} does not divide "
                f"the stage's {name} {big}",
                fix="choose a template size that divides every stage's width and bottleneck",
            )
    return d // d0, r // r0


class DecomposedHyper(nn.Module):
    """``z → (W_down (d×r), W_up (r×d))`` as products of low-rank factors, for each width in
    ``shapes`` (a list of ``(d, r)``; ``which`` picks one)."""

    def __init__(self, z_dim: int, hidden: int, shapes: list[tuple[int, int]], k: int):
        super().__init__()
        self.k = k
        self.trunk = nn.Linear(z_dim, hidden)
        self.heads = nn.ModuleList()
        for d, r in shapes:
            pair = nn.ModuleDict(
                {
                    "down_l": nn.Linear(hidden, d * k),
                    "down_r": nn.Linear(hidden, r * k),
                    "up_l": nn.Linear(hidden, r * k),
                    "up_r": nn.Linear(hidden, d * k),
                }
            )
            nn.init.zeros_(pair["up_l"].weight)
            nn.init.zeros_(pair["up_l"].bias)
            self.heads.append(pair)
        self.shapes = shapes

    def forward(self, z: Tensor, which: int) -> tuple[Tensor, Tensor]:
        (d, r), h, k = self.shapes[which], F.gelu(self.trunk(z)), self.k
        pair = self.heads[which]
        down = pair["down_l"](h).view(d, k) @ pair["down_r"](h).view(r, k).T
        up = pair["up_l"](h).view(r, k) @ pair["up_r"](h).view(d, k).T
        return down / k**0.5, up / k**0.5


class _Generated(MultiTask):
    """Frozen backbone + one generated bottleneck adapter per block; ``ratio`` sets r = d/ratio."""

    def __init__(
        self, backbone: HierBackbone, tasks: tuple[str, ...], ratio: int, emb: int, classes: int
    ):
        super().__init__(freeze(backbone), tasks, classes)
        self.widths = [backbone.cfg.widths[s] for s in backbone.stage_of]
        self.ranks = [max(1, w // ratio) for w in self.widths]
        self.task_emb = nn.Parameter(torch.randn(len(self.tasks), emb) * 0.1)
        self.layer_emb = nn.Parameter(torch.randn(len(self.widths), emb) * 0.1)

    def weights(self, task: int, layer: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def hooks(self, task: str) -> tuple[None, BlockHook]:
        t = self.task_index(task)

        def after(i: int, x: Tensor) -> Tensor:
            down, up = self.weights(t, i)
            return x + F.gelu(x @ down) @ up

        return None, after

    def z(self, task: int, layer: int) -> Tensor:
        return torch.cat([self.task_emb[task], self.layer_emb[layer]])


class Polyhistor(_Generated):
    """Decomposed hypernetworks emit each (task, layer)'s adapter (rank ``k`` factors)."""

    def __init__(
        self,
        backbone: HierBackbone,
        tasks: tuple[str, ...] = DENSE_TASKS,
        *,
        ratio: int = 8,
        k: int = 2,
        emb: int = 16,
        hidden: int = 8,
        classes: int = 10,
    ):
        super().__init__(backbone, tasks, ratio, emb, classes)
        shapes = sorted(set(zip(self.widths, self.ranks, strict=True)))
        self.which = [shapes.index(s) for s in zip(self.widths, self.ranks, strict=True)]
        self.hyper = DecomposedHyper(2 * emb, hidden, shapes, k)

    def weights(self, task: int, layer: int) -> tuple[Tensor, Tensor]:
        return self.hyper(self.z(task, layer), self.which[layer])


class PolyhistorLite(_Generated):
    """Lite hypernetworks emit ``d₀×r₀`` templates per (task, layer); task-shared per-layer
    scaling kernels expand them (``W_ℓ = S_ℓ ⊗ W_tmpl``) to every stage's width."""

    def __init__(
        self,
        backbone: HierBackbone,
        tasks: tuple[str, ...] = DENSE_TASKS,
        *,
        ratio: int = 8,
        template: tuple[int, int] | None = None,
        k: int = 2,
        emb: int = 16,
        hidden: int = 8,
        classes: int = 10,
    ):
        super().__init__(backbone, tasks, ratio, emb, classes)
        d0, r0 = template or (self.widths[0], self.ranks[0])
        shapes = [scaling_shape(d, r, d0, r0) for d, r in zip(self.widths, self.ranks, strict=True)]
        self.hyper = DecomposedHyper(2 * emb, hidden, [(d0, r0)], k)
        # Down kernels start at ones (the template reaches every block), up kernels too; the
        # zero-initialised up template keeps the start at the backbone.
        self.down_kernels = nn.ParameterList(nn.Parameter(torch.ones(a, b)) for a, b in shapes)
        self.up_kernels = nn.ParameterList(nn.Parameter(torch.ones(b, a)) for a, b in shapes)

    def weights(self, task: int, layer: int) -> tuple[Tensor, Tensor]:
        down, up = self.hyper(self.z(task, layer), 0)
        return kron_expand(down, self.down_kernels[layer]), kron_expand(up, self.up_kernels[layer])
