"""Bi-LoRA: LoRA whose factors are trained and stored at ``b`` bits (Jie, Wang, Deng; ICCV 2023).

Spec peft.md §14. Each factor W ∈ {A, B} is used as W_q = Q_b((W − μ)/(σ + 1e-5))·σ + μ with μ,
σ the matrix's mean and std and Q_b the nearest level of a fixed normal codebook
(:func:`splice.adapters._bits.normal_codebook`; b=1: ±0.6745), straight-through in backward. A
(Down) is Kaiming-uniform; B (Up) ~ TruncNormal(0, 0.001², ±0.002): it must be non-zero, as
standardising a zero matrix divides by zero, so the model changes slightly at step 0
(``identity_at_init = False``). ΔW = s·B_q@A_q with s = α/r (the paper's per-dataset scale s is α/r
here). The adapter file holds, per site, one uint8 tensor: each factor's packed ``b``-bit codes,
then the float32 (μ, σ) of each — b/8 bytes per entry plus 8 per matrix — and loading expands
them once into the factors used from then on (a loaded adapter is not re-quantised). Trainable:
r·(d_in + d_out) latent fp32 entries per site. ``head`` names targets that are a "Bi-head"
instead (the paper's 1-bit classifier): the whole weight trains as a latent copy of W₀, used and
stored at b bits (d_in·d_out entries; ΔW = Q(W) − W₀ is dense, so such a model merges but
exports no PEFT LoRA). Bi-AdaptFormer (the same quantiser on the parallel adapter's
bottleneck) is :mod:`splice.adapters.biadaptformer`; both pack through
:class:`splice.adapters._bits.PackedMatrices`.
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from splice.deltas import Delta, Dense

from ._bits import PackedMatrices, small_nonzero_
from ._primitives import scaling, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = ["BiLoRAAdapter", "BiLoRAConfig"]

ROLES = ("A", "B")


class BiLoRAConfig(MethodConfig):
    r: int = pydantic.Field(8, gt=0, description="rank")
    alpha: float = pydantic.Field(16.0, description="scale numerator: s = alpha/r")
    bits: int = pydantic.Field(1, ge=1, le=8, description="bits per stored factor entry")
    up_std: float = pydantic.Field(
        1e-3, gt=0, description="std of Up's truncated-normal init (cut at ±2 std)"
    )
    head: list[str] = pydantic.Field(
        [], description="targets (full names) whose whole weight trains at b bits: a Bi-head"
    )


class _Quantised(PackedMatrices, Adapter):
    """An adapter whose matrices ``packed_roles`` are used and stored at ``bits`` bits."""

    def __init__(self, site: Site, scale: float, cfg: BiLoRAConfig) -> None:
        super().__init__(site, scale, cfg.dropout)
        self.bits = cfg.bits


class BiLoRAAdapter(_Quantised):
    packed_roles = ("lora_A", "lora_B")

    def __init__(self, site: Site, cfg: BiLoRAConfig) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg)
        self.lora_A = uniform_parameter(cfg.r, site.d_in)
        self.lora_B = nn.Parameter(small_nonzero_(torch.empty(site.d_out, cfg.r), cfg.up_std))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.quantised("lora_B"), self.quantised("lora_A")


class BiHeadAdapter(_Quantised):
    """The paper's "Bi-head": the whole weight of a (new) head layer trains as a latent copy
    of W₀ and is used at ``bits`` bits; y = x·Q(W)ᵀ + b, as y + x·(Q(W) − W₀)ᵀ."""

    packed_roles = ("weight",)

    def __init__(self, site: Site, cfg: BiLoRAConfig) -> None:
        super().__init__(site, 1.0, cfg)
        self.weight = nn.Parameter(torch.zeros(site.d_out, site.d_in))

    def bind(self, base_layer: nn.Module) -> None:
        w0 = base_layer.weight.detach().reshape(self.site.d_out, -1).float().clone()
        self.register_buffer("w0", w0, persistent=False)  # unmerge needs W₀ back
        if self._loaded is None:
            with torch.no_grad():
                self.weight.copy_(w0)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift = self.quantised("weight") - self.w0
        return y + self.site.down(self.dropout(x), shift).to(y.dtype)

    def delta(self) -> Delta:
        shift = (self.quantised("weight") - self.w0).detach()
        return Dense(shift.reshape(self.site.weight_shape))


@METHODS.register("bilora")
class BiLoRA(Method):
    pretty_name = "Bi-LoRA (1-bit)"
    reference_url = "https://arxiv.org/abs/2307.16867"
    family = "reparameterized"
    Config = BiLoRAConfig
    kinds = frozenset({"linear", "conv1d_gpt2", "conv"})
    identity_at_init = False  # Up must be non-zero for the standardisation

    def build(self, sites: list[Site], cfg: BiLoRAConfig) -> list[Adapter]:
        return [
            BiHeadAdapter(s, cfg) if s.name in cfg.head else BiLoRAAdapter(s, cfg) for s in sites
        ]

    def num_parameters(self, sites: list[Site], cfg: BiLoRAConfig) -> int:
        return sum(
            s.d_in * s.d_out if s.name in cfg.head else cfg.r * (s.d_in + s.d_out) for s in sites
        )
