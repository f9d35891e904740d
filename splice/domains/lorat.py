"""LoRAT — LoRA for a one-stream ViT tracker (Lin et al., ECCV 2024; spec peft.md §21).

Template and search tokens run jointly through one pretrained ViT. What makes LoRA work there:

- *Decoupled input embeddings* (:class:`DecoupledEmbedding`): the pretrained patch embedding
  and absolute position embeddings, shared by both crops (interpolated to each crop's grid),
  plus small learned token-type embeddings (template / search) and a foreground-indicator
  embedding on template tokens inside the target box — so the backbone sees inputs like the
  ones it was pretrained on. With the type and foreground embeddings at zero, a crop of the
  pretraining size embeds exactly as the pretrained ViT embeds it.
- An anchor-free *MLP-only* head (:class:`~splice.domains.tracking.MLPHead`).
- LoRA on every linear of attention and MLP (:func:`add_lora`, splice's ``lora`` adapter),
  merged into the weights after training (:func:`merge_lora`), so inference costs what the
  plain tracker costs.

Ours: the backbone (:mod:`splice.domains.backbones.vit`, pretrained on 28×28 images), crop
sizes (template 16 px, search 32 px), the head's loss (:func:`~splice.domains.tracking.head_loss`).
The paper uses DINOv2 ViT-B/14 with r = α = 64; we keep α = r (scale 1) at our small rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters import adapter_layers, inject, remove_adapters
from splice.adapters.lora import LoRAAdapter
from splice.domains.backbones.vit import ViT, interpolate_pos, patchify
from splice.domains.tracking import MLPHead, check_tiling

__all__ = [
    "LINEARS",
    "DecoupledEmbedding",
    "FusedLoRA",
    "OneStreamTracker",
    "add_lora",
    "merge_lora",
]

LINEARS = ("q", "k", "v", "proj", "fc1", "fc2")  # every linear of the backbone's blocks


class DecoupledEmbedding(nn.Module):
    """patch(x) + interp(pos) + type[crop] (+ fg[inside box] on template tokens)."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.patch = vit.cfg.patch
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.type_embed = nn.Parameter(torch.zeros(2, vit.cfg.dim))
        self.fg_embed = nn.Parameter(torch.zeros(2, vit.cfg.dim))

    def one(self, img: Tensor, kind: int, fg: Tensor | None = None) -> Tensor:
        """Tokens of one crop (B, H, W); ``kind`` 0 = template, 1 = search."""
        p = self.patch
        check_tiling(img.shape[-2], p, "template" if kind == 0 else "search")
        check_tiling(img.shape[-1], p, "template" if kind == 0 else "search")
        grid = (img.shape[-2] // p, img.shape[-1] // p)
        x = self.patch_embed(patchify(img, p)) + interpolate_pos(self.pos_embed, grid)
        x = x + self.type_embed[kind]
        return x if fg is None else x + self.fg_embed[fg]

    def forward(self, template: Tensor, search: Tensor, fg: Tensor) -> Tensor:
        return torch.cat([self.one(template, 0, fg), self.one(search, 1)], 1)


class OneStreamTracker(nn.Module):
    """Decoupled embeddings → the ViT's blocks on [template; search] → MLP head on the search
    tokens. Built from a pretrained :class:`ViT` (its classifier head is dropped)."""

    def __init__(self, vit: ViT, template: int = 16, search: int = 32, hidden: int = 32):
        super().__init__()
        check_tiling(template, vit.cfg.patch, "template")
        check_tiling(search, vit.cfg.patch, "search")
        self.template, self.search, self.patch = template, search, vit.cfg.patch
        self.embed = DecoupledEmbedding(vit)
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.head = MLPHead(vit.cfg.dim, hidden, vit.cfg.patch, search)

    def n_template(self) -> int:
        return (self.template // self.patch) ** 2

    def forward(self, template: Tensor, search: Tensor, fg: Tensor) -> tuple[Tensor, Tensor]:
        """(scores (B, Ns), boxes (B, Ns, 4) in search-crop pixels)."""
        x = self.embed(template, search, fg)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, self.n_template() :])


class FusedLoRA(LoRAAdapter):
    """splice's LoRA adapter run as one GEMM with ``W + s·B@A`` (same parameters, state and
    merge). On a CPU the two rank-r GEMMs of the unfused branch (and their four in backward)
    are skinny and memory-bound: at d = 64, r = 3 they cost more than the weight gradient that
    freezing W saves, while ``W + s·B@A`` is a (d_out × r × d_in) product, negligible."""

    wraps_base = True

    def around(self, base: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
        B, A = self.factors()
        return F.linear(x, torch.addmm(base.weight, B, A, alpha=self.scale), base.bias)


def add_lora(
    tracker: OneStreamTracker, r: int = 3, alpha: float | None = None, fused: bool = True
) -> nn.Module:
    """LoRA (splice's ``lora`` adapter) on every linear of the blocks; everything else frozen
    but the type/foreground embeddings and the head, which train in full. ``fused`` runs each
    adapted linear as :class:`FusedLoRA` (equal outputs and gradients, faster on CPUs)."""
    inject(
        tracker,
        "lora",
        r"blocks\.\d+\.(attn\.)?(q|k|v|proj|fc1|fc2)",
        r=r,
        alpha=float(r if alpha is None else alpha),
    )
    if fused:
        for layer in adapter_layers(tracker).values():
            layer.adapter.__class__ = FusedLoRA
    for p in [tracker.embed.type_embed, tracker.embed.fg_embed, *tracker.head.parameters()]:
        p.requires_grad_(True)
    return tracker


def merge_lora(tracker: nn.Module) -> nn.Module:
    """Fold the trained LoRA into the weights and drop the adapter layers (plain tracker)."""
    return remove_adapters(tracker, merge=True)
