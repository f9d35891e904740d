"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024) — peft's layout.

ΔW = diag(λ_b)·B·diag(λ_d)·A with one frozen random pair shared by every adapted layer:
A (r, max d_in) and B (max d_out, r), kaiming-uniform, drawn from ``seed`` (peft's
``projection_prng_key``, the same draws) and sliced to each layer's shape. A and B are
regenerated from the seed, never stored (cached per process like NOLA's bases, within
:func:`~splice.adapters.set_basis_cache`'s budget). Only λ_b (d_out, init 0, so ΔW = 0) and
λ_d (r, init ``d_initial``) train: d_out + r per adapted matrix. ΔW is rank r: the low-rank
machinery of every other factor method exports it exactly; the forward scales activations
by the vectors, as peft does (their gradients are then sums over tokens, not a GEMM).
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.errors import SpliceError

from ._primitives import seeded_kaiming
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig


class VeRAConfig(MethodConfig):
    r: int = pydantic.Field(256, gt=0, description="rank of the shared random projections")
    d_initial: float = pydantic.Field(0.1, description="initial value of λ_d")
    seed: int = pydantic.Field(0, ge=0, description="seed of the shared A and B")


class VeRAAdapter(Adapter):
    def __init__(self, site: Site, cfg: VeRAConfig, largest: tuple[int, int]) -> None:
        super().__init__(site, 1.0, cfg.dropout)
        self.seed, self.r, self.largest = cfg.seed, cfg.r, largest
        self.vera_lambda_b = nn.Parameter(torch.zeros(site.d_out))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), cfg.d_initial))

    def shared(self) -> tuple[Tensor, Tensor]:
        """The shared (A, B), regenerated from the seed (a cached, read-only pair)."""
        d_out, d_in = self.largest
        shapes = ((self.r, d_in), (d_out, self.r))
        return seeded_kaiming(self.seed, shapes, self.vera_lambda_b.device)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """y + λ_b ⊙ ((λ_d ⊙ x·Aᵀ)·Bᵀ), peft's order: the vectors scale activations, so
        their gradients are sums over tokens; scaling B instead (:meth:`factors`) would take
        a (d_out, r) weight-gradient GEMM through B·diag(λ_d) every backward."""
        A, B = self.shared()
        dtype = y.dtype
        h = self.site.down(self.dropout(x), A[:, : self.site.d_in]).to(dtype)
        u = F.linear(h * self.vera_lambda_d.to(dtype), B[: self.site.d_out].to(dtype))
        return torch.addcmul(y, u, self.site.per_out(self.vera_lambda_b, y))

    def factors(self) -> tuple[Tensor, Tensor]:
        A, B = self.shared()
        B = B[: self.site.d_out] * self.vera_lambda_d
        return B * self.vera_lambda_b[:, None], A[:, : self.site.d_in]


@METHODS.register("vera")
class VeRA(Method):
    pretty_name = "VeRA"
    reference_url = "https://arxiv.org/abs/2310.11454"
    family = "reparameterized"
    Config = VeRAConfig
    peft_type = "VERA"
    peft_tensors = ("vera_lambda_b", "vera_lambda_d")
    kinds = frozenset({"linear", "conv1d_gpt2"})  # as peft's VeRA

    def to_peft(self, cfg: VeRAConfig, sites: list[Site]) -> dict[str, Any]:
        return {"r": cfg.r, "projection_prng_key": cfg.seed, "save_projection": False,
                "d_initial": cfg.d_initial, "vera_dropout": cfg.dropout,
                "bias": "none"}  # fmt: skip

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        options = {"r": fields.pop("r"), "seed": fields.pop("projection_prng_key", 0)}
        options["d_initial"] = fields.pop("d_initial", 0.1)
        options["dropout"] = fields.pop("vera_dropout", 0.0)
        fields.pop("save_projection", None)
        if shared:  # saved projections: splice regenerates them, so they must be the seed's
            a, b = shared["vera_A"], shared["vera_B"]
            mine = seeded_kaiming(options["seed"], (tuple(a.shape), tuple(b.shape)))
            if not (torch.equal(mine[0], a.float()) and torch.equal(mine[1], b.float())):
                raise SpliceError(
                    "the dir's vera_A/vera_B are not the projections projection_prng_key draws",
                    fix="re-save it with peft from the same seed",
                )
        return options

    def build(self, sites: list[Site], cfg: VeRAConfig) -> list[Adapter]:
        largest = (max(s.d_out for s in sites), max(s.d_in for s in sites))
        return [VeRAAdapter(site, cfg, largest) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: VeRAConfig) -> int:
        return sum(s.d_out + cfg.r for s in sites)
