"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., FedPara, ICLR 2022; LyCORIS).

ΔW = s·(W1a@W1b) ⊙ (W2a@W2b), each pair of rank r, s = α/r. The Hadamard product of two
rank-r matrices is the rank-r² product U@V with U = W1a ⊙̂ W2a (the r² column products) and
V = W1b ⊙̂ W2b (the r² row products), so splice runs LoHa as a rank-r² low-rank adapter: no
d_out×d_in ΔW in the forward (peft builds it every step), and the delta and a PEFT LoRA export
are exact at rank r². Init as peft: W1a, W1b, W2a kaiming-uniform, W2b = 0, so ΔW = 0.
Trainable parameters: 2r·(d_in + d_out) per adapted matrix.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._primitives import scaling, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method
from .lora import RankConfig


class LoHaConfig(RankConfig):
    """``r`` is the rank of each of the two pairs."""


def khatri_rao(u1: Tensor, v1: Tensor, u2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """(U, V) with U@V = (u1@v1) ⊙ (u2@v2): u (d_out, r), v (r, d_in) → rank r₁·r₂."""
    u = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
    v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    return u, v


class LoHaAdapter(Adapter):
    def __init__(self, site: Site, cfg: LoHaConfig) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        self.hada_w1_a = uniform_parameter(site.d_out, cfg.r)
        self.hada_w1_b = uniform_parameter(cfg.r, site.d_in)
        self.hada_w2_a = uniform_parameter(site.d_out, cfg.r)
        self.hada_w2_b = uniform_parameter(cfg.r, site.d_in)
        self.hada_w2_b.data.zero_()

    def factors(self) -> tuple[Tensor, Tensor]:
        return khatri_rao(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)


@METHODS.register("loha")
class LoHa(Method):
    pretty_name = "LoHa"
    reference_url = "https://arxiv.org/abs/2108.06098"
    family = "reparameterized"
    Config = LoHaConfig

    peft_type = "LOHA"
    peft_tensors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def to_peft(self, cfg: LoHaConfig, sites: list[Site]) -> dict[str, Any]:
        return {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                "use_effective_conv2d": False, "rank_pattern": cfg.rank_pattern,
                "alpha_pattern": cfg.alpha_pattern}  # fmt: skip

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        keys = ("r", "alpha", "rank_pattern", "alpha_pattern")
        return {k: fields.pop(k) for k in keys if k in fields}

    def build(self, sites: list[Site], cfg: LoHaConfig) -> list[Adapter]:
        return [LoHaAdapter(site, cfg.at(site)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: LoHaConfig) -> int:
        return sum(2 * cfg.at(s).r * (s.d_in + s.d_out) for s in sites)
