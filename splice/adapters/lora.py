"""LoRA (Hu et al., 2021) with rsLoRA scaling (Kalajdzievski, 2023) — spec peft.md §1.

ΔW = s·B@A with A (r, d_in) ~ U(±1/√d_in), B (d_out, r) = 0, so the model is unchanged at
step 0; s = α/r, or α/√r with ``use_rslora``. Embeddings swap the roles (A = 0, B ~ N(0, 1)),
as the reference code and peft do, so the lookup path gets a gradient.
``rank_pattern``/``alpha_pattern`` set r and α per module (peft's fields, matched as peft does).
Trainable parameters: r·(d_in + d_out) per adapted matrix.
"""

from __future__ import annotations

from typing import Self

import pydantic
import torch
from torch import Tensor, nn

from splice.io.peft import pattern_value

from ._primitives import scaling, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig


class RankConfig(MethodConfig):
    """A rank and a scale numerator, overridable per module as peft's patterns do."""

    r: int = pydantic.Field(8, gt=0, description="rank")
    alpha: float = pydantic.Field(16.0, description="scale numerator: s = alpha/r")
    rank_pattern: dict[str, int] = pydantic.Field(
        default_factory=dict, description="regex on module names → its r (peft's rule)"
    )
    alpha_pattern: dict[str, float] = pydantic.Field(
        default_factory=dict, description="regex on module names → its alpha"
    )

    def at(self, site: Site) -> Self:
        """This config with ``r`` and ``alpha`` of the first pattern matching ``site``'s name
        (``re.match("(.*\\.)?(key)$", name)``, as peft matches them)."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        r = pattern_value(self.rank_pattern, site.name, self.r)
        alpha = pattern_value(self.alpha_pattern, site.name, self.alpha)
        return self.model_copy(update={"r": r, "alpha": alpha})


class LoRAConfig(RankConfig):
    use_rslora: bool = pydantic.Field(False, description="s = alpha/sqrt(r) (rsLoRA)")


class LoRAAdapter(Adapter):
    def __init__(self, site: Site, cfg: LoRAConfig) -> None:
        mode = "alpha_over_sqrt_r" if cfg.use_rslora else "alpha_over_r"
        super().__init__(site, scaling(cfg.alpha, cfg.r, mode), cfg.dropout)
        if site.kind == "embedding":
            self.lora_A = nn.Parameter(torch.zeros(cfg.r, site.d_in))
            self.lora_B = nn.Parameter(torch.randn(site.d_out, cfg.r))
        else:
            self.lora_A = uniform_parameter(cfg.r, site.d_in)
            self.lora_B = nn.Parameter(torch.zeros(site.d_out, cfg.r))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A


@METHODS.register("lora")
class LoRA(Method):
    pretty_name = "LoRA / rsLoRA"
    reference_url = "https://arxiv.org/abs/2106.09685"
    family = "reparameterized"
    Config = LoRAConfig

    def build(self, sites: list[Site], cfg: LoRAConfig) -> list[Adapter]:
        return [LoRAAdapter(site, cfg.at(site)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: LoRAConfig) -> int:
        return sum(cfg.at(s).r * (s.d_in + s.d_out) for s in sites)
