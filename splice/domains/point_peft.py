"""Point-PEFT: point-prior prompts + geometry-aware adapters on a frozen point transformer
(Tang, Zhang, Guo et al., AAAI 2024; peft.md §21).

- **Point-prior prompt** (:class:`PointPriorPrompt`): ``P`` learnable tokens (TruncNormal std
  0.02) enter the sequence after the class token. Before use they are enhanced by a
  parameter-free attention over a *memory bank* of domain features that the frozen
  pretrained model extracts from the training set (:func:`memory_bank`: each training
  cloud's mean group token at the embedding, the layer the prompts enter):
  ``p ← p + λ·softmax(p̂ B̂ᵀ/τ) B`` (``^``: unit-normalised rows). [recon]: the paper's
  feature layer, τ and λ are not in the abstract; ours are stated here.
- **Geometry-aware adapter** (:class:`GeometryAdapter`), after every block: each group token
  is projected down (``d → r``, GELU), max-pooled over its ``k`` nearest group centres in 3-D
  (itself included) and added to its own projection, then projected up (zero-initialised, so
  the adapted model starts as the backbone): ``h ← h + Up(z + max_{j∈kNN(i)} z_j)``. The class
  and prompt tokens get ``h + Up(z)``. Max over a neighbourhood does not depend on its order,
  so the adapter is equivariant under any permutation of the groups.

Backbone frozen; prompts, adapters and a new head train.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.domains.backbones.points import Groups, PointTransformer, knn

__all__ = ["GeometryAdapter", "PointPEFT", "PointPriorPrompt", "memory_bank"]


@torch.no_grad()
def memory_bank(backbone: PointTransformer, batches: Iterable[Groups], size: int = 512) -> Tensor:
    """(≤ size, dim): the mean group token at the embedding of each training cloud."""
    rows, n = [], 0
    for g in batches:
        rows.append(backbone.tokens(g)[:, 1:].mean(1))
        n += rows[-1].shape[0]
        if n >= size:
            break
    return torch.cat(rows)[:size]


class PointPriorPrompt(nn.Module):
    """Learnable prompt tokens enhanced by parameter-free attention over a memory bank."""

    def __init__(
        self,
        dim: int,
        tokens: int = 10,
        bank: Tensor | None = None,
        tau: float = 0.1,
        weight: float = 1.0,
    ):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(tokens, dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        self.register_buffer("bank", torch.zeros(0, dim) if bank is None else bank.detach().clone())
        self.tau, self.weight = tau, weight

    def forward(self) -> Tensor:
        p = self.prompts
        if self.bank.shape[0] == 0:
            return p
        attn = torch.softmax(
            F.normalize(p, dim=-1) @ F.normalize(self.bank, dim=-1).T / self.tau, -1
        )
        return p + self.weight * attn @ self.bank


class GeometryAdapter(nn.Module):
    """``Up(z + max over kNN of z)``, ``z = GELU(Down(h))``, for group tokens (see module doc)."""

    def __init__(self, dim: int, r: int = 8):
        super().__init__()
        self.down, self.up = nn.Linear(dim, r), nn.Linear(r, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """The update (B, G, dim) for tokens ``h`` (B, G, dim); ``neighbours`` (B, G, k) indexes
        each token's neighbours among the same ``G`` (None: no neighbourhood term)."""
        z = F.gelu(self.down(h))
        if neighbours is not None:
            rows = torch.arange(h.shape[0])[:, None, None]
            z = z + z[rows, neighbours].amax(2)
        return self.up(z)


class PointPEFT(nn.Module):
    """A frozen :class:`PointTransformer` with Point-PEFT's prompts and adapters, a new head."""

    def __init__(
        self,
        backbone: PointTransformer,
        classes: int,
        *,
        tokens: int = 10,
        r: int = 8,
        k: int = 8,
        bank: Tensor | None = None,
        tau: float = 0.1,
        bank_weight: float = 1.0,
    ):
        super().__init__()
        for p in backbone.parameters():
            p.requires_grad_(False)
        d = backbone.cfg.dim
        self.backbone, self.k = backbone, k
        self.prompt = PointPriorPrompt(d, tokens, bank, tau, bank_weight) if tokens else None
        self.adapters = nn.ModuleList(GeometryAdapter(d, r) for _ in backbone.blocks)
        self.head = nn.Linear(2 * d, classes)

    def forward(self, g: Groups) -> Tensor:
        nbr = knn(g.centers, g.centers, self.k)
        prompts = None if self.prompt is None else self.prompt().expand(g.centers.shape[0], -1, -1)
        lead = 1 + (0 if prompts is None else prompts.shape[1])

        def after(i: int, x: Tensor) -> Tensor:
            a = self.adapters[i]
            return x + torch.cat([a(x[:, :lead]), a(x[:, lead:], nbr)], 1)

        return self.head(self.backbone.features(g, prompts, after))
