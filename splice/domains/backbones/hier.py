"""A small hierarchical (Swin-like) vision backbone [ours] for the dense multi-task methods.

Stand-in for Swin / DaViT (issue #34): splice pretrains it itself (``splice.bench.domains.dense``),
since no offline package ships a hierarchical ViT. A 4×4 patch embedding, then stages of
growing width (default 32, 64, 128) joined by 2×2 patch merging; each stage is a stack of
pre-norm transformer blocks with window attention (window 4; odd blocks of a stage shift the
windows cyclically by half a window, without Swin's attention mask [ours]).

Blocks sit in one flat ``blocks`` list (``blocks.{i}.attn.qkv`` …), so adapters address them
by layer index. :meth:`HierBackbone.features` takes the two hooks the methods need: prefix
tokens entering a given block (TAP-SLF's prompts; stripped at the end of that block's stage)
and a function applied after every block (Polyhistor's adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.errors import SpliceError

__all__ = ["Attention", "Block", "HierBackbone", "HierConfig", "Mlp"]

BlockHook = Callable[[int, Tensor], Tensor]
"""``(block index, tokens (B, prefix + H·W, C)) → tokens``, applied after each block."""


@dataclass(frozen=True)
class HierConfig:
    image: int = 32
    channels: int = 1
    patch: int = 4
    widths: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (2, 2, 4)
    heads: tuple[int, ...] = (2, 4, 8)
    window: int = 4
    mlp_ratio: int = 2
    classes: int = 10

    @property
    def grids(self) -> list[int]:
        """Token-grid side of each stage."""
        return [self.image // self.patch // 2**s for s in range(len(self.widths))]


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence (``qkv`` and ``proj`` linears)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; ``window`` > 0 attends within windows of the ``hw`` grid.

    The first ``n_prefix`` tokens are prefix tokens (prompts): with several windows they join
    every window's attention and their output is the mean over the windows.
    """

    def __init__(
        self, dim: int, heads: int, mlp_ratio: int = 2, window: int = 0, shift: bool = False
    ):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, hw: tuple[int, int] = (0, 0), n_prefix: int = 0) -> Tensor:
        x = x + self._attend(self.norm1(x), hw, n_prefix)
        return x + self.mlp(self.norm2(x))

    def _attend(self, x: Tensor, hw: tuple[int, int], n_prefix: int) -> Tensor:
        (h, w), win = hw, self.window
        if win <= 0 or (h <= win and w <= win):
            return self.attn(x)
        b, _, c = x.shape
        prefix, grid = x[:, :n_prefix], x[:, n_prefix:].reshape(b, h, w, c)
        if self.shift:
            grid = grid.roll((-(win // 2), -(win // 2)), (1, 2))
        nh, nw = h // win, w // win
        wins = (
            grid.reshape(b, nh, win, nw, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
        )
        out = self.attn(torch.cat([prefix.repeat_interleave(nh * nw, 0), wins], 1))
        prefix = out[:, :n_prefix].reshape(b, nh * nw, n_prefix, c).mean(1)
        grid = out[:, n_prefix:].reshape(b, nh, nw, win, win, c).permute(0, 1, 3, 2, 4, 5)
        grid = grid.reshape(b, h, w, c)
        if self.shift:
            grid = grid.roll((win // 2, win // 2), (1, 2))
        return torch.cat([prefix, grid.reshape(b, h * w, c)], 1)


class PatchMerge(nn.Module):
    """2×2 neighbouring tokens concatenated (4C) → LayerNorm → ``reduction`` to the next width."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        (h, w), b, c = hw, x.shape[0], x.shape[-1]
        g = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, -1, 4 * c)
        return self.reduction(self.norm(g))


class HierBackbone(nn.Module):
    """Patch embedding, stages of window-attention blocks, patch merging, a classifier head."""

    def __init__(self, cfg: HierConfig = HierConfig()):
        super().__init__()
        n = len(cfg.widths)
        if not (len(cfg.depths) == len(cfg.heads) == n):
            raise SpliceError(
                "widths, depths and heads differ in length", fix="one entry per stage"
            )
        if cfg.image % (cfg.patch * 2 ** (n - 1)):
            raise SpliceError(
                f"image side {cfg.image} does not tile patch {cfg.patch} × 2^{n - 1} merges",
                fix="choose an image side divisible by patch·2^(stages−1)",
            )
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.widths[0], cfg.patch, cfg.patch)
        self.embed_norm = nn.LayerNorm(cfg.widths[0])
        self.pos = nn.Parameter(torch.zeros(1, cfg.grids[0] ** 2, cfg.widths[0]))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.stage_of: list[int] = [s for s in range(n) for _ in range(cfg.depths[s])]
        self.blocks = nn.ModuleList(
            Block(
                cfg.widths[s],
                cfg.heads[s],
                cfg.mlp_ratio,
                cfg.window,
                shift=(i - sum(cfg.depths[:s])) % 2 == 1,
            )
            for i, s in enumerate(self.stage_of)
        )
        self.merges = nn.ModuleList(
            PatchMerge(cfg.widths[s], cfg.widths[s + 1]) for s in range(n - 1)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(wd) for wd in cfg.widths)
        self.head = nn.Linear(cfg.widths[-1], cfg.classes)

    def features(
        self,
        images: Tensor,
        prefix: dict[int, Tensor] | None = None,
        after_block: BlockHook | None = None,
    ) -> list[Tensor]:
        """Per-stage feature maps ``(B, C_s, H_s, W_s)`` of ``images`` ``(B, channels, S, S)``.

        ``prefix[i]`` (``(P, C)`` or ``(B, P, C)``) is prepended to the tokens entering block
        ``i`` and stripped after the last block of that block's stage.
        """
        cfg, prefix = self.cfg, prefix or {}
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = self.embed_norm(x) + self.pos
        maps: list[Tensor] = []
        n_prefix = 0
        for i, block in enumerate(self.blocks):
            s = self.stage_of[i]
            if i in prefix:
                p = prefix[i]
                if p.shape[-1] != x.shape[-1]:
                    raise SpliceError(
                        f"prefix for block {i} has width {p.shape[-1]}, the block {x.shape[-1]}",
                        fix="give prefix tokens of the width of the stage they enter",
                    )
                p = p.expand(x.shape[0], -1, -1) if p.dim() == 2 else p
                x, n_prefix = torch.cat([p.to(x.dtype), x], 1), n_prefix + p.shape[1]
            x = block(x, (cfg.grids[s],) * 2, n_prefix)
            if after_block is not None:
                x = after_block(i, x)
            if i + 1 == len(self.blocks) or self.stage_of[i + 1] != s:
                x, n_prefix = x[:, n_prefix:], 0
                g = cfg.grids[s]
                maps.append(self.norms[s](x).transpose(1, 2).reshape(x.shape[0], -1, g, g))
                if s + 1 < len(cfg.widths):
                    x = self.merges[s](x, (g, g))
        return maps

    def forward(self, images: Tensor) -> Tensor:
        """Class logits from the mean-pooled last stage (the pretraining task)."""
        return self.head(self.features(images)[-1].mean((2, 3)))
