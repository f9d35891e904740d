"""A small Vision Transformer for 28×28 grey images (issue #34): the backbone splice pretrains
itself for the tracking methods (LoRAT, SEATrack) and reuses as the DDPM denoiser's blocks.

Pre-norm blocks with *separate* ``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2`` linears, so that
adapters can target any of them by name (SEATrack puts LoRA on ``k``/``v`` only). The attention
exposes its pre-softmax logits (:meth:`Attention.logits`) for methods that mix attention maps.
Sizes are ours (dim 64, 4 blocks, 4 heads, patch 4): pretraining is minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Block", "ViT", "ViTConfig", "interpolate_pos", "patchify"]


@dataclass(frozen=True)
class ViTConfig:
    image: int = 28
    patch: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    classes: int = 10

    @property
    def grid(self) -> int:
        return self.image // self.patch

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def patchify(img: Tensor, patch: int) -> Tensor:
    """(B, H, W) or (B, C, H, W) → (B, (H/p)·(W/p), C·p·p), row-major over the patch grid."""
    if img.dim() == 3:
        img = img.unsqueeze(1)
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def interpolate_pos(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Position embeddings (1, g·g, d) of a square grid resampled (bicubic) to ``grid`` (h, w);
    returned unchanged when the grid already matches (LoRAT's shared embeddings)."""
    g = math.isqrt(pos.shape[1])
    if (g, g) == tuple(grid):
        return pos
    p = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    p = F.interpolate(p, size=grid, mode="bicubic", align_corners=False)
    return p.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pre-softmax attention logits (B, heads, N, N), values (B, heads, N, d/heads))."""
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        return (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), v

    def mix(self, logits: Tensor, v: Tensor) -> Tensor:
        """softmax(logits)·v, heads merged, then the output projection."""
        out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(v.shape[0], -1, v.shape[1] * v.shape[3]))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def mlp(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x + self.attn(self.norm1(x)))


class ViT(nn.Module):
    """Patch embedding (a linear map of p×p patches) + learned absolute positions + blocks +
    final norm; ``head`` classifies the mean token (pretraining only)."""

    def __init__(self, cfg: ViTConfig = ViTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def embed(self, img: Tensor) -> Tensor:
        """Patch tokens plus the position embeddings (interpolated to the image's grid)."""
        p = self.cfg.patch
        grid = (img.shape[-2] // p, img.shape[-1] // p)
        return self.patch_embed(patchify(img, p)) + interpolate_pos(self.pos_embed, grid)

    def features(self, tokens: Tensor) -> Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, img: Tensor) -> Tensor:
        """Class logits of (B, 28, 28) images."""
        return self.head(self.features(self.embed(img)).mean(1))
