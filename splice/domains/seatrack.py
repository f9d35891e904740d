"""SEATrack — AMG-LoRA and a hierarchical MoE fusion for two-modality tracking (Su, Xue et al.,
CVPR 2026; spec peft.md §21 and its errata).

A frozen one-stream RGB tracker (:class:`~splice.domains.lorat.OneStreamTracker`, LoRAT-trained
and merged) runs twice — on the visible crops and on the second modality's ("thermal") crops.

- **AMG-LoRA**: LoRA on the ``k`` and ``v`` projections of blocks 1, 3, … (r = 8, no α/r
  scaling), one set shared by both modalities (errata), plus *adaptive mutual guidance* in
  the same blocks: each modality's pre-softmax attention map is refined by the other's,
  ``S_rgb ← S_rgb + w_rt·S_t`` and ``S_t ← S_t + w_tr·S_rgb``, with learnable scalars
  initialised to 1.0 (errata). With both weights at zero the two streams are two independent
  runs of the LoRA-adapted tracker. The additive form is [recon]: the errata says the maps
  are mixed by learnable scalars, not how.
- **HMoE** [recon] (:class:`HierarchicalMoE`): two Soft-MoE stages (Puigcerver et al.; the
  errata: 4 experts × 2 slots) over the search tokens of both streams — a local stage whose
  slots gather tokens of one modality (modality-specific experts), then a global stage over
  the tokens of both. Its output projection starts at zero, so fusion starts as the visible
  stream alone. The frozen tracker's head reads the fused search tokens.

``mutual=False`` gives the plain two-stream LoRA baseline (same LoRA and fusion, no guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters import inject
from splice.domains.lorat import OneStreamTracker

__all__ = ["HierarchicalMoE", "SEATrack", "SoftMoE"]


class SoftMoE(nn.Module):
    """Soft-MoE: slots = softmax-over-tokens(XΦ)ᵀ·X, one small MLP per expert on its slots,
    output = softmax-over-slots(XΦ)·(expert outputs). X (B, M, d) → (B, M, d)."""

    def __init__(self, dim: int, experts: int = 4, slots: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.experts, self.slots = experts, slots
        self.phi = nn.Parameter(torch.randn(dim, experts * slots) / dim**0.5)
        self.up = nn.Parameter(torch.randn(experts, dim, hidden) / dim**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, dim) / hidden**0.5)

    def forward(self, x: Tensor) -> Tensor:
        logits = x @ self.phi  # (B, M, E·S)
        slots = logits.softmax(1).transpose(1, 2) @ x  # (B, E·S, d)
        b, _, d = slots.shape
        s = slots.reshape(b, self.experts, self.slots, d)
        y = torch.einsum("besd,edh->besh", s, self.up)
        y = torch.einsum("besh,ehd->besd", F.gelu(y), self.down).reshape(b, -1, d)
        return logits.softmax(-1) @ y


class HierarchicalMoE(nn.Module):
    """Local Soft-MoE per modality, then a global Soft-MoE over both; the fused token at each
    search position is the visible token plus the zero-initialised projection of the global
    outputs at that position in both streams. [recon]"""

    def __init__(self, dim: int, experts: int = 4, slots: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.local_rgb = SoftMoE(dim, experts, slots, hidden)
        self.local_x = SoftMoE(dim, experts, slots, hidden)
        self.glob = SoftMoE(dim, experts, slots, hidden)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, rgb: Tensor, x: Tensor) -> Tensor:
        local = torch.cat([rgb + self.local_rgb(rgb), x + self.local_x(x)], 1)
        g = local + self.glob(local)
        n = rgb.shape[1]
        return rgb + self.out(g[:, :n] + g[:, n:])


class SEATrack(nn.Module):
    """Two-stream tracker on a frozen :class:`OneStreamTracker` (see the module docstring)."""

    def __init__(
        self,
        tracker: OneStreamTracker,
        layers: tuple[int, ...] | None = None,
        r: int = 8,
        mutual: bool = True,
        guidance_init: float = 1.0,
        experts: int = 4,
        slots: int = 2,
    ) -> None:
        super().__init__()
        depth = len(tracker.blocks)
        self.layers = tuple(range(1, depth, 2)) if layers is None else tuple(layers)
        for p in tracker.parameters():
            p.requires_grad_(False)
        inject(tracker, "lora", ["k", "v"], layers=self.layers, r=r, alpha=float(r))
        self.tracker = tracker
        init = guidance_init if mutual else 0.0
        self.guidance = nn.Parameter(torch.full((len(self.layers), 2), init), requires_grad=mutual)
        dim = tracker.norm.normalized_shape[0]
        self.fusion = HierarchicalMoE(dim, experts, slots)

    def streams(
        self, templates: list[Tensor], searches: list[Tensor], fg: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The normed search tokens of both streams after the guided backbone."""
        t = self.tracker
        a = t.embed(templates[0], searches[0], fg)
        b = t.embed(templates[1], searches[1], fg)
        for i, block in enumerate(t.blocks):
            if i not in self.layers:
                a, b = block(a), block(b)
                continue
            w = self.guidance[self.layers.index(i)]
            sa, va = block.attn.logits(block.norm1(a))
            sb, vb = block.attn.logits(block.norm1(b))
            a = block.mlp(a + block.attn.mix(sa + w[0] * sb, va))
            b = block.mlp(b + block.attn.mix(sb + w[1] * sa, vb))
        nt = t.n_template()
        return t.norm(a)[:, nt:], t.norm(b)[:, nt:]

    def forward(
        self, templates: list[Tensor], searches: list[Tensor], fg: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(scores (B, Ns), boxes (B, Ns, 4)) from the fused search tokens."""
        return self.tracker.head(self.fusion(*self.streams(templates, searches, fg)))
