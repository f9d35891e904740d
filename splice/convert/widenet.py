"""WideNet — "Go Wider Instead of Deeper" (Xue et al., AAAI 2022; spec peft.md §9) as a small
ViT family trained from scratch, beside its two baselines.

- ``widenet``: ONE self-attention and ONE top-2 MoE FFN (noisy router, capacity factor,
  load-balance loss) shared by all ``depth`` layers; each layer keeps two private
  LayerNorms, so the shared router sees different inputs per layer.
  ``h ← h + Attn(LN1_ℓ(h))``, ``h ← h + MoE(LN2_ℓ(h))``.
- ``vit``: ``depth`` private blocks with dense FFNs (same width and depth).
- ``vit-moe``: private blocks, the FFN of every other block (the 2nd, 4th, …) a private MoE.

Patches are linearly embedded with learned positions; the head mean-pools the tokens,
applies a final LayerNorm and a zero-initialised linear classifier. MoE details follow
GShard/Switch [recon: the spec leaves them to the reference code]: router noise
``N(0, noise/E)`` on the logits while training; each token's top-2 gates renormalised to sum
to 1; expert capacity ``ceil(C · tokens · 2 / E)`` with ``C`` = ``capacity_train`` (train) or
``capacity_eval``, first choices placed before second choices (overflow dropped, the residual
carries the token); balance loss ``E · Σ_e f_e · P_e`` per MoE call (``f_e``: share of tokens
whose first choice is ``e``; ``P_e``: mean router probability), weighted by ``balance``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from splice._schema import Strict

__all__ = ["MoE", "ViTConfig", "WideNet", "widenet_parameters"]


class ViTConfig(Strict):
    """Shape of a small ViT of one of the three kinds."""

    kind: Literal["widenet", "vit", "vit-moe"] = "widenet"
    image_size: int = Field(28, gt=0)
    patch: int = Field(7, gt=0)
    channels: int = Field(1, gt=0)
    dim: int = Field(64, gt=0)
    depth: int = Field(6, gt=0)
    heads: int = Field(4, gt=0)
    hidden: int = Field(128, gt=0, description="FFN hidden width (each expert's)")
    experts: int = Field(4, ge=2)
    capacity_train: float = Field(1.25, gt=0)
    capacity_eval: float = Field(2.0, gt=0)
    noise: float = Field(1.0, ge=0)
    balance: float = Field(0.01, ge=0)
    classes: int = Field(10, gt=1)


def _ffn(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class MoE(nn.Module):
    """Top-2 mixture of ``experts`` FFNs with a noisy router and a capacity limit."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.experts = nn.ModuleList(_ffn(cfg.dim, cfg.hidden) for _ in range(cfg.experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, balance loss)`` for tokens ``x`` of shape ``(..., d)``."""
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        n, e = len(x), self.cfg.experts
        logits = self.router(x)
        if self.training and self.cfg.noise > 0:
            logits = logits + torch.randn_like(logits) * (self.cfg.noise / e)
        probs = logits.softmax(-1)
        gates, choice = probs.topk(2, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        factor = self.cfg.capacity_train if self.training else self.cfg.capacity_eval
        capacity = math.ceil(factor * n * 2 / e)
        out, filled = torch.zeros_like(x), torch.zeros(e, dtype=torch.long, device=x.device)
        for rank in range(2):  # first choices claim capacity before second choices
            onehot = F.one_hot(choice[:, rank], e)
            position = (onehot.cumsum(0) - 1 + filled) * onehot
            keep = (onehot.bool() & (position < capacity)).any(-1)
            filled = filled + onehot.sum(0)
            for expert in range(e):
                rows = (keep & (choice[:, rank] == expert)).nonzero()[:, 0]
                if len(rows):
                    y = self.experts[expert](x[rows]) * gates[rows, rank, None]
                    out = out.index_add(0, rows, y)
        first = F.one_hot(choice[:, 0], e).float().mean(0)
        balance = e * (first * probs.mean(0)).sum()
        return out.reshape(shape), balance


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class WideNet(nn.Module):
    """A small ViT (``cfg.kind``): ``forward(images)`` → ``(logits, balance loss)``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n_layers = cfg.dim, cfg.depth
        tokens = (cfg.image_size // cfg.patch) ** 2
        self.embed = nn.Linear(cfg.patch * cfg.patch * cfg.channels, d)
        self.position = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_layers))
        shared = cfg.kind == "widenet"
        self.attn = nn.ModuleList(_Attention(cfg) for _ in range(1 if shared else n_layers))
        if shared:
            self.ffn = nn.ModuleList([MoE(cfg)])
        else:
            moe = cfg.kind == "vit-moe"
            self.ffn = nn.ModuleList(
                MoE(cfg) if moe and i % 2 else _ffn(d, cfg.hidden) for i in range(n_layers)
            )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def patches(self, images: Tensor) -> Tensor:
        """``(b, c, H, W)`` → ``(b, tokens, p·p·c)``."""
        p = self.cfg.patch
        x = images.unfold(2, p, p).unfold(3, p, p)  # b, c, h, w, p, p
        return x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(self.patches(images)) + self.position
        balance = h.new_zeros(())
        for i in range(self.cfg.depth):
            h = h + self.attn[i % len(self.attn)](self.ln1[i](h))
            ffn = self.ffn[i % len(self.ffn)]
            if isinstance(ffn, MoE):
                y, b = ffn(self.ln2[i](h))
                balance = balance + b
            else:
                y = ffn(self.ln2[i](h))
            h = h + y
        logits = self.head(self.norm(h.mean(1)))
        return logits, self.cfg.balance * balance


def widenet_parameters(cfg: ViTConfig) -> int:
    """WideNet's parameter count by the spec's formula: ``|Attn| + E·|FFN| + |router| +
    L·4d`` (private LayerNorms) plus the patch embedding, positions, final norm and head."""
    d, h = cfg.dim, cfg.hidden
    attn = 4 * d * d + 4 * d
    ffn = 2 * d * h + h + d
    router = d * cfg.experts
    tokens = (cfg.image_size // cfg.patch) ** 2
    embed = (cfg.patch * cfg.patch * cfg.channels + 1) * d + tokens * d
    head = 2 * d + (d + 1) * cfg.classes
    return attn + cfg.experts * ffn + router + cfg.depth * 4 * d + embed + head
