"""NOLA: LoRA factors as combinations of seeded random bases (Koohpayegani et al., ICLR 2024).

Spec peft.md §3, LLM code path: A = A₀ + Σ_{i<k} α_i·Â_i, B = Σ_{j<l} β_j·B̂_j, with Â, B̂ i.i.d.
U(±1)/√k (resp. /√l) from per-matrix seeds and A₀ ~ U(±1/√d_in) frozen; α = β = 0 at init, so
ΔW = 0 while β still gets a gradient through A₀. Only α, β train (k + l per matrix); bases are
regenerated from the seeds in forward and backward, never stored.
"""

from __future__ import annotations

import math

import pydantic
import torch
from torch import Tensor, nn

from ._primitives import scaling, seeded_combination, seeded_uniform, site_seed
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig


class NOLAConfig(MethodConfig):
    r: int = pydantic.Field(8, gt=0, description="rank of the generated A, B")
    alpha: float = pydantic.Field(8.0, description="scale numerator: s = alpha/r")
    k: int = pydantic.Field(256, gt=0, description="number of random bases for A")
    l: int = pydantic.Field(256, gt=0, description="number of random bases for B")  # noqa: E741
    seed: int = pydantic.Field(0, ge=0, description="seed of every site's bases")


class NOLAAdapter(Adapter):
    def __init__(self, site: Site, cfg: NOLAConfig) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        self.r = cfg.r
        self.coef_A = nn.Parameter(torch.zeros(cfg.k))
        self.coef_B = nn.Parameter(torch.zeros(cfg.l))
        seeds = [site_seed(cfg.seed, site.name, role) for role in ("A0", "A", "B")]
        self.register_buffer("seeds", torch.tensor(seeds, dtype=torch.int64))

    def factors(self) -> tuple[Tensor, Tensor]:
        s0, sa, sb = self.seeds.tolist()
        d_in, d_out = self.site.d_in, self.site.d_out
        a0 = seeded_uniform(s0, (self.r, d_in), 1 / math.sqrt(d_in), self.coef_A.device)
        A = a0 + seeded_combination(self.coef_A, sa, (self.r, d_in))
        return seeded_combination(self.coef_B, sb, (d_out, self.r)), A


@METHODS.register("nola")
class NOLA(Method):
    pretty_name = "NOLA"
    reference_url = "https://arxiv.org/abs/2310.02556"
    family = "reparameterized"
    Config = NOLAConfig

    def build(self, sites: list[Site], cfg: NOLAConfig) -> list[Adapter]:
        return [NOLAAdapter(site, cfg) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: NOLAConfig) -> int:
        return len(sites) * (cfg.k + cfg.l)
