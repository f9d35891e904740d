"""The shared building blocks of spec peft.md §22.2, used by every method file.

P1 low-rank factors (init, scaling), P2 seeded random bases with coefficients, P3 shard pools
addressed by static index maps, P4 top-k routers and their auxiliary losses. Methods compose
these; none of them re-implements one.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
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
    "seeded_kaiming",
    "seeded_uniform",
    "set_basis_cache",
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


class _SeededCache:
    """Seeded tensors kept on their device, least recently used first out, within a byte budget.

    Regenerating NOLA's bases from the seed every step is the spec's memory trick (§3), and
    the right one for models whose bases outgrow memory; for the rest it is pure cost — on a
    GPU the bases are drawn on the CPU (so they are the same on every device) and copied over
    each step. Tensors are cached only while they fit the budget; what does not fit is
    regenerated as before, so values, and results, are identical either way.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple, nbytes: int, make: Callable[[], Tensor]) -> Tensor | None:
        """The cached tensor of ``key``, made now if it fits; None if ``nbytes`` never fits."""
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        if nbytes > self.max_bytes:
            return None
        self._evict_to(self.max_bytes - nbytes)
        t = make()
        self.entries[key] = t
        self.bytes += nbytes
        return t

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict_to(max_bytes)

    def _evict_to(self, limit: int) -> None:
        while self.entries and self.bytes > limit:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


_CACHE = _SeededCache(256 << 20)


def set_basis_cache(max_bytes: int) -> None:
    """Bytes of seeded random bases (NOLA) kept per process, all devices together (default
    256 MiB).

    0 regenerates every basis in every forward and backward (spec peft.md §3's memory trick);
    the default keeps a small model's bases (all-MiniLM-L6 with k=l=384 on query/value: 113 MiB)
    and regenerates a large one's. Values are the same either way.
    """
    if max_bytes < 0:
        raise ValueError("max_bytes must be ≥ 0")
    _CACHE.resize(max_bytes)


def _draw(seed: int, shape: tuple[int, ...], bound: float) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).mul_(2 * bound).sub_(bound)


def seeded_uniform(
    seed: int, shape: tuple[int, ...], bound: float, device: torch.device | str = "cpu"
) -> Tensor:
    """U(±bound) of ``shape`` on ``device``, drawn by a dedicated CPU generator (the global RNG
    is untouched; the same values on every device). Do not modify the result: it may be cached.
    """

    def make() -> Tensor:
        return _draw(seed, shape, bound).to(device)

    key = ("uniform", seed, tuple(shape), bound, str(device))
    made = _CACHE.get(key, 4 * math.prod(shape), make)
    return made if made is not None else make()


def seeded_kaiming(
    seed: int, shapes: tuple[tuple[int, int], ...], device: torch.device | str = "cpu"
) -> tuple[Tensor, ...]:
    """Matrices drawn one after another from one CPU generator seeded ``seed``, each
    kaiming-uniform U(±√(6/fan_in)) with fan_in its second dim (VeRA's shared projections, drawn
    as peft draws them from ``projection_prng_key``). Cached like :func:`seeded_uniform`."""

    def make() -> Tensor:
        g = torch.Generator().manual_seed(seed)
        parts = []
        for shape in shapes:
            bound = math.sqrt(6.0 / shape[1])
            parts.append(torch.empty(shape).uniform_(-bound, bound, generator=g).reshape(-1))
        return torch.cat(parts).to(device)

    key = ("kaiming", seed, tuple(shapes), str(device))
    flat = _CACHE.get(key, 4 * sum(math.prod(s) for s in shapes), make)
    flat = make() if flat is None else flat
    parts = flat.split([math.prod(s) for s in shapes])
    return tuple(t.view(s) for t, s in zip(parts, shapes, strict=True))


_CHUNK_ELEMENTS = 1 << 22  # bases generated per chunk; fixed so regeneration is identical


def _chunk_rows(numel: int) -> int:
    """Bases per chunk: the chunk boundaries, which the cache keeps too (same arithmetic)."""
    return max(1, _CHUNK_ELEMENTS // numel)


def _drawn_chunks(seed: int, n: int, numel: int, scale: float) -> Iterator[tuple[int, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    per = _chunk_rows(numel)
    for start in range(0, n, per):
        c = min(per, n - start)
        yield start, torch.rand((c, numel), generator=g).mul_(2 * scale).sub_(scale)


def _basis_chunks(
    seed: int, n: int, numel: int, scale: float, device: torch.device | str
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, bases)`` with bases (c, numel) ~ U(±1)·scale, regenerated identically
    (from the cache when they fit it: the same chunks, so the same arithmetic)."""
    key = ("bases", seed, n, numel, scale, str(device))

    def make() -> Tensor:
        return torch.cat([b for _, b in _drawn_chunks(seed, n, numel, scale)]).to(device)

    cached = _CACHE.get(key, 4 * n * numel, make)
    per = _chunk_rows(numel)
    if cached is not None:
        for start in range(0, n, per):
            yield start, cached[start : start + per]
        return
    for start, bases in _drawn_chunks(seed, n, numel, scale):
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
