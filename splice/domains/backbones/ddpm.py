"""A small class-conditional DDPM on 28×28 grey images (issue #34): the denoiser HyperAlign
aligns, its noise schedule, loss and ancestral sampler.

The denoiser is a ViT (the blocks of :mod:`splice.domains.backbones.vit`, so its attention and
MLP linears are named ``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2``) over 4×4 patches, with a
timestep token and a class token prepended ("in-context" conditioning); it predicts the noise
ε. Class ``classes`` is the null class (dropped condition, 10 % of training examples). The
schedule is DDPM's linear β ∈ [1e-4, 0.02] over 1000 steps; :func:`sample` runs ancestral
DDPM sampling on ``steps`` evenly spaced timesteps (a respaced schedule), drawing its noise
from one ``torch.Generator`` — the same seed gives the same samples. Sizes are ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.domains.backbones.vit import Block, patchify
from splice.errors import SpliceError

__all__ = [
    "DDPMConfig",
    "Denoiser",
    "check_classes",
    "ddpm_loss",
    "noise_schedule",
    "sample",
    "timesteps",
]

Eps = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""(x_t, t (B,), class (B,), sampling step index) → predicted noise."""


@dataclass(frozen=True)
class DDPMConfig:
    image: int = 28
    patch: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    classes: int = 10
    T: int = 1000

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def noise_schedule(T: int) -> Tensor:
    """ᾱ_t (T,) of DDPM's linear β schedule from 1e-4 to 0.02."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def check_classes(c: Tensor, classes: int) -> None:
    """Conditions must be classes of the model (and of the reward model)."""
    bad = c[(c < 0) | (c >= classes)]
    if bad.numel():
        raise SpliceError(
            f"condition {int(bad[0])} is outside the {classes} classes",
            fix=f"use a class in 0..{classes - 1}",
        )


def _time_features(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angle = t.float()[:, None] * freqs[None]
    return torch.cat([angle.sin(), angle.cos()], -1)


class Denoiser(nn.Module):
    def __init__(self, cfg: DDPMConfig = DDPMConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        n = (cfg.image // cfg.patch) ** 2
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, n, cfg.dim) * 0.02)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.class_embed = nn.Embedding(cfg.classes + 1, cfg.dim)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.patch * cfg.patch)
        self.register_buffer("alpha_bar", noise_schedule(cfg.T), persistent=False)

    def tokens(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """[time token; class token; patch tokens + positions] (B, 2 + N, d)."""
        patches = self.patch_embed(patchify(x, self.cfg.patch)) + self.pos_embed
        time = self.time_mlp(_time_features(t, self.cfg.dim))[:, None]
        return torch.cat([time, self.class_embed(c)[:, None], patches], 1)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """Predicted noise ε (B, H, W) of noisy images x (B, H, W) at timesteps t, classes c."""
        h = self.tokens(x, t, c)
        for block in self.blocks:
            h = block(h)
        p, g = self.cfg.patch, self.cfg.image // self.cfg.patch
        out = self.out(self.norm(h)[:, 2:]).reshape(-1, g, g, p, p)
        return out.permute(0, 1, 3, 2, 4).reshape(-1, g * p, g * p)


def ddpm_loss(model: Denoiser, x0: Tensor, c: Tensor, g: torch.Generator, drop: float = 0.1):
    """‖ε − ε_θ(√ᾱ_t·x0 + √(1−ᾱ_t)·ε, t, c)‖² with t uniform and ``drop`` of the classes nulled."""
    b = x0.shape[0]
    t = torch.randint(model.cfg.T, (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    null = torch.rand(b, generator=g) < drop
    c = torch.where(null, torch.full_like(c, model.cfg.classes), c)
    a = model.alpha_bar[t].reshape(-1, 1, 1)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, c), eps)


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from T−1 down to 0."""
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


def sample(
    eps: Eps,
    alpha_bar: Tensor,
    c: Tensor,
    steps: int,
    g: torch.Generator,
    shape: tuple[int, int] = (28, 28),
) -> Tensor:
    """Ancestral DDPM sampling on the respaced schedule; returns x0 (B, H, W) in [−1, 1].

    The noise of the start and of every step comes from ``g`` in a fixed order, so two runs
    with equally seeded generators and equal ``eps`` give the same samples."""
    x = torch.randn((len(c), *shape), generator=g)
    ts = timesteps(len(alpha_bar), steps)
    for i, t in enumerate(ts):
        a = alpha_bar[t]
        a_prev = alpha_bar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        e = eps(x, torch.full((len(c),), t, dtype=torch.long), c, i)
        x0 = ((x - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)
        beta = 1 - a / a_prev
        mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a)
        if i + 1 < steps:
            z = torch.randn(x.shape, generator=g)
            x = mean + (beta * (1 - a_prev) / (1 - a)).sqrt() * z
        else:
            x = mean
    return x
