"""MoLA — MoE-LoRA with layer-wise expert allocation (Gao et al., 2024), spec peft.md §5.

Layer ℓ's adapted modules each hold E_ℓ rank-r experts (A_e, B_e) and a router W_r (E_ℓ, d_in).
Per token: p = softmax(W_r x), top-k, ĝ = p renormalised over the top-k, and
Δ(x) = Σ_{e∈top-k} ĝ_e·s·B_e A_e x. The experts are stacked, so the whole mixture is one
rank-E·r product with the rank-code gated per token. Not mergeable (routing depends on x).
Load-balancing loss E_ℓ·Σ_e f_e·P_e per layer, weighted by ``balance_coef`` (off by default;
the paper's value is 0.001). Trainable: Σ_ℓ Σ_m E_ℓ·(r·(d_in + d_out) + d_in).
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._primitives import load_balance_loss, scaling, softmax_topk, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig


class MoLAConfig(MethodConfig):
    r: int = pydantic.Field(8, gt=0, description="rank of each expert")
    alpha: float = pydantic.Field(16.0, description="scale numerator: s = alpha/r")
    experts: int | list[int] = pydantic.Field(
        4, description="experts per layer: one count, or a list indexed by layer index"
    )
    top_k: int = pydantic.Field(2, gt=0, description="experts used per token")
    balance_coef: float = pydantic.Field(0.0, ge=0.0, description="load-balancing loss weight")
    dropout: float = pydantic.Field(0.05, ge=0.0, lt=1.0, description="dropout on the input")


class MoLAAdapter(Adapter):
    def __init__(self, site: Site, cfg: MoLAConfig, n_experts: int) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        self.r, self.top_k, self.n_experts = cfg.r, cfg.top_k, n_experts
        self.keep_logits = cfg.balance_coef > 0
        self.lora_A = uniform_parameter(n_experts * cfg.r, site.d_in)  # experts stacked on rows
        self.lora_B = nn.Parameter(torch.zeros(site.d_out, n_experts * cfg.r))
        self.router = uniform_parameter(n_experts, site.d_in)
        self.last_logits: Tensor | None = None

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        cd = self.site.channel_dim
        logits = self.site.down(x, self.router).movedim(cd, -1)  # (..., E)
        if self.training and self.keep_logits:
            self.last_logits = logits.reshape(-1, self.n_experts)
        gates, _ = softmax_topk(logits.float(), self.top_k)
        h = self.site.down(self.dropout(x), self.lora_A)  # (..., E·r) code, channel at cd
        h = h * gates.to(h.dtype).repeat_interleave(self.r, dim=-1).movedim(-1, cd)
        return self.site.up_add(y, h, self.lora_B, self.scale)

    def delta(self):
        raise SpliceError(
            "MoLA routes each token to its own experts, so it has no single ΔW to merge",
            where=self.site.name,
            fix="keep the adapter unmerged and serve it dynamically",
        )


def _experts(cfg: MoLAConfig, site: Site) -> int:
    if isinstance(cfg.experts, int):
        n = cfg.experts
    elif site.layer is None or site.layer >= len(cfg.experts):
        raise SpliceError(
            f"experts list has {len(cfg.experts)} entries, none for layer {site.layer}",
            where=site.name,
            fix="give one expert count per layer index, or a single int",
        )
    else:
        n = cfg.experts[site.layer]
    if not cfg.top_k <= n:
        raise SpliceError(f"top_k={cfg.top_k} > {n} experts", where=site.name, fix="lower top_k")
    return n


@METHODS.register("mola")
class MoLA(Method):
    pretty_name = "MoLA (MoE-LoRA, layer-wise experts)"
    reference_url = "https://arxiv.org/abs/2402.08562"
    family = "hybrid"
    Config = MoLAConfig
    mergeable = False  # routes each token to its own experts

    def build(self, sites: list[Site], cfg: MoLAConfig) -> list[Adapter]:
        return [MoLAAdapter(site, cfg, _experts(cfg, site)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: MoLAConfig) -> int:
        return sum(_experts(cfg, s) * (cfg.r * (s.d_in + s.d_out) + s.d_in) for s in sites)

    def aux_loss(self, adapters: list[Adapter], cfg: MoLAConfig) -> Tensor | None:
        """0.001-style weighted Σ_ℓ E_ℓ·Σ_e f_e·P_e over each layer's routed tokens."""
        if cfg.balance_coef == 0:
            return None
        by_layer: dict[int | None, list[Tensor]] = {}
        for a in adapters:
            if a.last_logits is not None:
                by_layer.setdefault(a.site.layer, []).append(a.last_logits)
        if not by_layer:
            return None
        total = sum(load_balance_loss(torch.cat(ls), cfg.top_k) for ls in by_layer.values())
        return cfg.balance_coef * total
