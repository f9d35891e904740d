"""LoKr: low-rank Kronecker product (Edalati et al., KronA, 2022; LyCORIS) — peft's layout.

ΔW = s·W1 ⊗ W2 (s = α/r) on the (d_out, d_in) weight, conv kernels flattened into d_in:
d_out = a·b and the input channels c·d split by peft's ``factorization`` (the factor pair
nearest √n, or ``decompose_factor``); W1 (a, c) and W2 (b, d·k) where k is the kernel size.
W2 is W2a@W2b of rank r unless r ≥ max(b, d)/2; with ``decompose_both`` W1 likewise. Init as
peft: W1 (or W1a) = 0, so ΔW = 0. Linear layers never build ΔW: (W1 ⊗ W2)·x is W1·X·W2ᵀ with
x viewed as the (c, d) matrix X, and the backward recomputes W1·X from X instead of keeping it
(an activation-sized tensor per layer: peft keeps the weight-sized ΔW instead, so keeping W1·X
put splice's peak memory above peft's); conv layers convolve with the dense ΔW. Not low-rank
(rank of W1 times rank of W2): exported as a dense delta. Trainable parameters: the factors'
sizes.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from splice.deltas import Dense

from ._primitives import scaling, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method
from .lora import RankConfig


class LoKrConfig(RankConfig):
    """``r`` is the rank of the decomposed Kronecker factors."""

    decompose_both: bool = pydantic.Field(False, description="low-rank W1 too")
    decompose_factor: int = pydantic.Field(-1, description="factor size (-1: nearest √n)")


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """(m, n/m), m ≤ n/m: ``factor`` if it divides n, else the divisor pair whose sum is least
    among those with m ≤ ``factor`` (peft's and LyCORIS' rule)."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    limit = n if factor == -1 else factor
    m, k = 1, n
    while m < k:
        nm = m + 1
        while n % nm:
            nm += 1
        if nm + n // nm > m + k or nm > limit:
            break
        m, k = nm, n // nm
    return (k, m) if m > k else (m, k)


def shapes(site: Site, cfg: LoKrConfig) -> tuple[tuple[int, int], tuple[int, int], int]:
    """((a, b), (c, d), k): d_out = a·b, input channels = c·d, k the kernel's size."""
    channels = site.weight_shape[1] if site.kind == "conv" else site.d_in
    kernel = site.d_in // channels
    out = factorization(site.d_out, cfg.decompose_factor)
    inn = factorization(channels, cfg.decompose_factor)
    return out, inn, kernel


class _KronApply(torch.autograd.Function):
    """y + s·W1·X·W2ᵀ for y (N, a, b), X (N, c, d), W1 (a, c), W2 (b, d), the last product
    one GEMM that accumulates onto y (``addmm``, beta 1: no (N, a, b) temporary). Saves X and
    the factors only and recomputes P = W1·X in the backward (one extra (a, c)·(c, d) product
    per example); ∂W1 sums per-example (a, c) products instead of contracting over (N, d),
    which would copy X and ∂P into permuted layouts."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, w1, w2)
        ctx.scale = scale
        p = torch.matmul(w1, x).reshape(-1, w2.shape[1])
        return torch.addmm(y.reshape(-1, w2.shape[0]), p, w2.t(), alpha=scale).view(y.shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        # in the forward's compute dtype (autocast's, which the backward runs without);
        # autograd casts each gradient back to its input's dtype
        x, w1, w2 = (t.to(g.dtype) for t in ctx.saved_tensors)
        _, need_x, need_w1, need_w2, _ = ctx.needs_input_grad
        gx = gw1 = gw2 = None
        flat = g.reshape(-1, w2.shape[0])  # (N·a, b)
        if need_w2:  # first: P is freed before ∂L/∂P and x's gradient exist (one fewer live)
            p = torch.matmul(w1, x).reshape(-1, w2.shape[1])
            gw2 = (flat.t() @ p).mul_(ctx.scale)
            del p
        dp = torch.matmul(flat, w2 * ctx.scale).view(x.shape[0], w1.shape[0], -1)  # ∂L/∂P
        if need_w1:
            gw1 = torch.matmul(dp, x.transpose(1, 2)).sum(0)
        if need_x:
            gx = torch.matmul(w1.t(), dp)
        return g, gx, gw1, gw2, None


def _factor(rows: int, cols: int, low: bool, r: int) -> dict[str, nn.Parameter]:
    """A full (rows, cols) factor, or a rank-r pair (name suffixes ``_a``, ``_b``)."""
    if low:
        return {"_a": uniform_parameter(rows, r), "_b": uniform_parameter(r, cols)}
    return {"": uniform_parameter(rows, cols)}


class LoKrAdapter(Adapter):
    def __init__(self, site: Site, cfg: LoKrConfig) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        (a, b), (c, d), k = self.dims = shapes(site, cfg)
        w1_low = cfg.decompose_both and cfg.r < max(a, c) / 2
        w2_low = cfg.r < max(b, d) / 2
        w1 = _factor(a, c, w1_low, cfg.r)
        next(iter(w1.values())).data.zero_()  # W1 (or W1a) = 0: ΔW = 0 at init
        for name, factor in [("lokr_w1", w1), ("lokr_w2", _factor(b, d * k, w2_low, cfg.r))]:
            for suffix, p in factor.items():
                setattr(self, name + suffix, p)

    def kron_factors(self) -> tuple[Tensor, Tensor]:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if hasattr(self, "lokr_w1_a") else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if hasattr(self, "lokr_w2_a") else self.lokr_w2
        return w1, w2

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        w1, w2 = self.kron_factors()
        x = self.dropout(x)
        if self.site.kind in ("linear", "conv1d_gpt2"):
            _, (c, d), _ = self.dims
            w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
            return _KronApply.apply(y, x.reshape(-1, c, d), w1, w2, self.scale)
        return y.add(self.site.down(x, torch.kron(w1, w2)), alpha=self.scale)

    def delta(self) -> Dense:
        w1, w2 = (t.detach().float() for t in self.kron_factors())
        return Dense(self.site.stored(torch.kron(w1, w2) * self.scale))


@METHODS.register("lokr")
class LoKr(Method):
    pretty_name = "LoKr"
    reference_url = "https://arxiv.org/abs/2212.10650"
    family = "reparameterized"
    Config = LoKrConfig
    kinds = frozenset({"linear", "conv1d_gpt2", "conv"})
    lowrank = False  # W1 ⊗ W2 has rank rank(W1)·rank(W2): exported as a dense delta

    peft_type = "LOKR"
    peft_tensors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    _fields = ("r", "alpha", "decompose_both", "decompose_factor", "rank_pattern", "alpha_pattern")

    def to_peft(self, cfg: LoKrConfig, sites: list[Site]) -> dict[str, Any]:
        return {**{k: getattr(cfg, k) for k in self._fields}, "rank_dropout": 0.0,
                "module_dropout": 0.0, "rank_dropout_scale": False,
                "use_effective_conv2d": False}  # fmt: skip

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        return {k: fields.pop(k) for k in self._fields if k in fields}

    def peft_shape(self, adapter: Adapter, name: str) -> tuple[int, ...] | None:
        if adapter.site.kind != "conv" or name != "lokr_w2":
            return None
        (_, b), (_, d), _ = adapter.dims
        return (b, d, *adapter.site.weight_shape[2:])

    def build(self, sites: list[Site], cfg: LoKrConfig) -> list[Adapter]:
        return [LoKrAdapter(site, cfg.at(site)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: LoKrConfig) -> int:
        total = 0
        for s in sites:
            (a, b), (c, d), k = shapes(s, cfg)
            r = cfg.at(s).r
            low1 = cfg.decompose_both and r < max(a, c) / 2
            total += r * (a + c) if low1 else a * c
            total += r * (b + d * k) if r < max(b, d) / 2 else b * d * k
        return total
