"""A small point-cloud transformer [ours] in the shape of Point-BERT / Point-MAE (issue #34).

A cloud of N points is split into G local groups: farthest point sampling (FPS) picks G
centres, each centre's k nearest points form its group (coordinates relative to the centre).
A mini-PointNet embeds each group to a token (shared per-point MLP, max over the group), an
MLP of the centre adds the position; a class token leads the sequence through plain
transformer blocks (``blocks.{i}.attn.qkv`` …, as :class:`~splice.domains.backbones.hier.Block`).
The pooled feature is the class token concatenated with the max over group tokens.

FPS starts from the point farthest from the cloud's centroid, so the whole model does not
depend on the order of the input points (up to ties in distance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from splice.domains.backbones.hier import Block
from splice.errors import SpliceError

__all__ = ["Groups", "PointConfig", "PointTransformer", "fps", "group", "knn"]


@dataclass(frozen=True)
class PointConfig:
    groups: int = 32
    k: int = 16
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    classes: int = 6


class Groups(NamedTuple):
    """``centers`` (B, G, 3) and ``local`` (B, G, k, 3): each group's points minus its centre."""

    centers: Tensor
    local: Tensor


def fps(xyz: Tensor, m: int) -> Tensor:
    """Indices (B, m) of ``m`` farthest-point samples of ``xyz`` (B, N, 3), starting from the
    point farthest from the centroid."""
    b, n, _ = xyz.shape
    if m > n:
        raise SpliceError(f"cannot sample {m} centres from {n} points", fix="use fewer groups")
    rows = torch.arange(b)
    far = (xyz - xyz.mean(1, keepdim=True)).square().sum(-1).argmax(1)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype)
    out = torch.empty(b, m, dtype=torch.long)
    for i in range(m):
        out[:, i] = far
        dist = torch.minimum(dist, (xyz - xyz[rows, far][:, None]).square().sum(-1))
        far = dist.argmax(1)
    return out


def knn(query: Tensor, ref: Tensor, k: int) -> Tensor:
    """Indices (B, M, k) of the ``k`` points of ``ref`` (B, N, 3) nearest each ``query`` point."""
    if ref.shape[1] < k:
        raise SpliceError(
            f"point cloud has {ref.shape[1]} points, fewer than k={k} neighbours",
            fix=f"give clouds of at least {k} points or lower k",
        )
    return torch.cdist(query, ref).topk(k, dim=-1, largest=False).indices


def group(xyz: Tensor, groups: int, k: int) -> Groups:
    """FPS centres and their kNN neighbourhoods of ``xyz`` (B, N, 3)."""
    rows = torch.arange(xyz.shape[0])[:, None]
    centers = xyz[rows, fps(xyz, groups)]
    idx = knn(centers, xyz, k)
    return Groups(centers, xyz[rows[..., None], idx] - centers[:, :, None])


class PointTransformer(nn.Module):
    """Group embedding + centre position MLP, a class token, transformer blocks, a head."""

    def __init__(self, cfg: PointConfig = PointConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.point_mlp = nn.Sequential(nn.Linear(3, 32), nn.GELU(), nn.Linear(32, 64))
        self.embed = nn.Linear(64, d)
        self.pos = nn.Sequential(nn.Linear(3, 32), nn.GELU(), nn.Linear(32, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(2 * d, cfg.classes)

    def group(self, xyz: Tensor) -> Groups:
        return group(xyz, self.cfg.groups, self.cfg.k)

    def tokens(self, g: Groups) -> Tensor:
        """Class token + group tokens with positions: (B, 1 + G, dim)."""
        tok = self.embed(self.point_mlp(g.local).amax(2)) + self.pos(g.centers)
        cls = (self.cls + self.cls_pos).expand(tok.shape[0], -1, -1)
        return torch.cat([cls, tok], 1)

    def features(
        self,
        g: Groups,
        prompts: Tensor | None = None,
        after_block: Callable[[int, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Pooled feature (B, 2·dim): class token ‖ max over group tokens.

        ``prompts`` (B, P, dim) are inserted after the class token before the first block and
        left out of the pooling; ``after_block(i, x)`` runs after block ``i`` on the whole
        sequence (class, prompts, groups).
        """
        x = self.tokens(g)
        p = 0 if prompts is None else prompts.shape[1]
        if prompts is not None:
            x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1:]], 1)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if after_block is not None:
                x = after_block(i, x)
        x = self.norm(x)
        return torch.cat([x[:, 0], x[:, 1 + p :].amax(1)], -1)

    def forward(self, xyz: Tensor | Groups) -> Tensor:
        g = xyz if isinstance(xyz, Groups) else self.group(xyz)
        return self.head(self.features(g))
