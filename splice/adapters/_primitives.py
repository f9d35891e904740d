"""The shared building blocks of spec peft.md §22.2, used by every method file.

P1 low-rank factors (init, scaling), P2 seeded random bases with coefficients, P3 shard pools
addressed by static index maps, P4 top-k routers and their auxiliary losses. Methods compose
these; none of them re-implements one.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ScalingMode",
    "kaiming_uniform",
    "load_balance_loss",
    "scaling",
    "seeded_combination",
    "seeded_uniform",
    "site_seed",
    "softmax_topk",
    "static_random_index",
    "uniform_parameter",
]

ScalingMode = Literal["alpha_over_r", "alpha_over_sqrt_r", "none"]


# P1 -------------------------------------------------------------------------------------------


def scaling(alpha: float, r: int, mode: ScalingMode = "alpha_over_r") -> float:
    """The output scale s of a low-rank update (§1: α/r, rsLoRA's α/√r, or 1)."""
    if mode == "none":
        return 1.0
    return alpha / math.sqrt(r) if mode == "alpha_over_sqrt_r" else alpha / r


def kaiming_uniform(t: Tensor, fan_in: int | None = None, a: float = math.sqrt(5)) -> Tensor:
    """In place kaiming-uniform: U(±√(6/((1+a²)·fan_in))); a=√5 gives U(±1/√fan_in) (§0.3)."""
    bound = math.sqrt(6.0 / ((1.0 + a * a) * (fan_in or t[0].numel())))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


def uniform_parameter(
    *shape: int, fan_in: int | None = None, a: float = math.sqrt(5)
) -> nn.Parameter:
    """A new fp32 parameter, kaiming-uniform (default fan-in: all but the first dim)."""
    return nn.Parameter(kaiming_uniform(torch.empty(shape), fan_in, a))


# P2 -------------------------------------------------------------------------------------------


def site_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed for (global seed, site name, role); same on every machine and run."""
    digest = hashlib.blake2b(":".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_uniform(seed: int, shape: tuple[int, ...], bound: float) -> Tensor:
    """U(±bound) of ``shape`` from a dedicated CPU generator: the global RNG is untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).mul_(2 * bound).sub_(bound)


_CHUNK_ELEMENTS = 1 << 22  # bases generated per chunk; fixed so regeneration is identical


def _basis_chunks(seed: int, n: int, numel: int, scale: float, device: torch.device):
    """Yield ``(start, bases)`` with bases (c, numel) ~ U(±1)·scale, regenerated identically."""
    g = torch.Generator().manual_seed(seed)
    per = max(1, _CHUNK_ELEMENTS // numel)
    for start in range(0, n, per):
        c = min(per, n - start)
        bases = torch.rand((c, numel), generator=g).mul_(2 * scale).sub_(scale)
        yield start, bases.to(device)


class _SeededCombination(torch.autograd.Function):
    """M = Σ_i c_i·basis_i with bases regenerated from the seed in forward and backward.

    ∂L/∂c_i = ⟨∂L/∂M, basis_i⟩_F, so no basis is ever stored (NOLA memory trick, §3).
    """

    @staticmethod
    def forward(ctx, coeffs: Tensor, seed: int, shape: tuple[int, ...], scale: float) -> Tensor:
        ctx.seed, ctx.shape, ctx.scale, ctx.n = seed, shape, scale, coeffs.numel()
        numel = math.prod(shape)
        out = torch.zeros(numel, dtype=torch.float32, device=coeffs.device)
        c32 = coeffs.float()
        for start, bases in _basis_chunks(seed, coeffs.numel(), numel, scale, coeffs.device):
            out.addmv_(bases.t(), c32[start : start + bases.shape[0]])
        return out.view(shape).to(coeffs.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        numel = math.prod(ctx.shape)
        g = grad.reshape(numel).float()
        n = ctx.n
        out = torch.empty(n, dtype=torch.float32, device=grad.device)
        for start, bases in _basis_chunks(ctx.seed, n, numel, ctx.scale, grad.device):
            torch.mv(bases, g, out=out[start : start + bases.shape[0]])
        return out.to(grad.dtype), None, None, None


def seeded_combination(coeffs: Tensor, seed: int, shape: tuple[int, ...]) -> Tensor:
    """NOLA's Σ_i c_i·B̂_i with B̂_i ~ U(±1)/√n i.i.d. from ``seed`` (n = number of coefficients)."""
    fn = _SeededCombination
    return fn.apply(coeffs, seed, tuple(shape), 1.0 / math.sqrt(coeffs.numel()))


# P3 -------------------------------------------------------------------------------------------


def static_random_index(seed: int, region: int, take: int) -> Tensor:
    """The first ``take`` entries of a seeded random permutation of ``range(region)`` (int64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(region, generator=g)[:take]


# P4 -------------------------------------------------------------------------------------------


def softmax_topk(
    logits: Tensor, k: int, *, renormalize: Literal["sum", "softmax"] = "sum"
) -> tuple[Tensor, Tensor]:
    """Top-k routing over the last dim: ``(weights, probs)``; weights are 0 off the top-k.

    ``renormalize="sum"``: ĝ_e = p_e / Σ_{top-k} p (MoLA, §5); ``"softmax"``: softmax of the
    top-k probabilities (EPT's released code, §6).
    """
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    w = top_p / top_p.sum(-1, keepdim=True) if renormalize == "sum" else top_p.softmax(-1)
    return torch.zeros_like(probs).scatter(-1, top_i, w), probs


def load_balance_loss(logits: Tensor, k: int) -> Tensor:
    """E·Σ_e f_e·P_e over tokens (rows of ``logits``, shape (N, E)); 1 under uniform routing.

    f_e = fraction of the N·k top-k slots given to expert e; P_e = mean router probability.
    """
    n, e = logits.shape
    probs = logits.float().softmax(-1)
    top = probs.topk(k, dim=-1).indices
    f = F.one_hot(top, e).sum((0, 1)).float() / (n * k)
    return e * (f * probs.mean(0)).sum()
