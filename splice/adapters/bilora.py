"""Bi-LoRA: LoRA whose factors are trained and stored at ``b`` bits (Jie, Wang, Deng; ICCV 2023).

Spec peft.md §14. Each factor W ∈ {A, B} is used as W_q = Q_b((W − μ)/(σ + 1e-5))·σ + μ with
μ, σ the matrix's mean and std and Q_b the nearest level of a fixed normal codebook
(:func:`splice.adapters._bits.normal_codebook`; b=1: ±0.6745), straight-through in backward.
A (Down) is Kaiming-uniform; B (Up) ~ TruncNormal(0, 0.001², ±0.002): it must be non-zero, as
standardising a zero matrix divides by zero, so the model changes slightly at step 0
(``zero_init = False``). ΔW = s·B_q@A_q with s = α/r (the paper's per-dataset scale s is
α/r here). The adapter file holds each factor's packed ``b``-bit codes and (μ, σ) — b/8 bytes
per entry plus 8 per matrix — and loading expands them once into the factors used from then
on (a loaded adapter is not re-quantised). Trainable: r·(d_in + d_out) latent fp32 entries per
site (the 1-bit head of the paper is not part of this method).
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._bits import expand, pack_codes, packed_bytes, quantize_ste, unpack_codes
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


class BiLoRAAdapter(Adapter):
    def __init__(self, site: Site, cfg: BiLoRAConfig) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        self.bits = cfg.bits
        self.lora_A = uniform_parameter(cfg.r, site.d_in)
        up = torch.empty(site.d_out, cfg.r)
        nn.init.trunc_normal_(up, 0.0, cfg.up_std, -2 * cfg.up_std, 2 * cfg.up_std)
        self.lora_B = nn.Parameter(up)
        self._loaded: dict[str, Tensor] | None = None  # the file's tensors once loaded

    def _quantised(self, role: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return quantize_ste(getattr(self, f"lora_{role}"), self.bits)

    def factors(self) -> tuple[Tensor, Tensor]:
        if self._loaded is not None:  # expanded once at load
            return self.lora_B, self.lora_A
        return self._quantised("B")[0], self._quantised("A")[0]

    def saved_tensors(self) -> dict[str, Tensor]:
        """``codes``: A's packed codes, then B's (each from a byte boundary); ``stats``:
        float32 (μ_A, σ_A, μ_B, σ_B)."""
        if self._loaded is not None:
            return dict(self._loaded)
        codes, stats = [], []
        for role in ROLES:
            _, q, mu, sigma = self._quantised(role)
            codes.append(pack_codes(q, self.bits))
            stats += [mu, sigma]
        return {"codes": torch.cat(codes), "stats": torch.stack(stats).detach().float().cpu()}

    def load_saved(self, tensors: dict[str, Tensor], where: str) -> None:
        codes, stats = tensors["codes"], tensors["stats"].float()
        params = [getattr(self, f"lora_{role}") for role in ROLES]
        sizes = [packed_bytes(p.numel(), self.bits) for p in params]
        if codes.dtype != torch.uint8 or codes.numel() != sum(sizes) or stats.numel() != 4:
            shapes = " and ".join(str(tuple(p.shape)) for p in params)
            raise SpliceError(
                f"the file holds {codes.numel()} bytes of codes; a {1 << self.bits}-level "
                f"codebook for factors {shapes} needs {sum(sizes)} (+ 4 floats of μ, σ)",
                where=where,
                fix="load the adapter with the bits it was saved with",
            )
        for i, (param, part) in enumerate(zip(params, codes.split(sizes), strict=True)):
            q = unpack_codes(part, self.bits, param.numel()).reshape(param.shape)
            with torch.no_grad():
                param.copy_(expand(q.to(param.device), self.bits, stats[2 * i], stats[2 * i + 1]))
        self._loaded = {k: v.clone() for k, v in tensors.items()}


@METHODS.register("bilora")
class BiLoRA(Method):
    pretty_name = "Bi-LoRA (1-bit)"
    reference_url = "https://arxiv.org/abs/2307.16867"
    family = "reparameterized"
    Config = BiLoRAConfig
    kinds = frozenset({"linear", "conv1d_gpt2", "conv"})
    zero_init = False  # Up must be non-zero for the standardisation

    def build(self, sites: list[Site], cfg: BiLoRAConfig) -> list[Adapter]:
        return [BiLoRAAdapter(site, cfg) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: BiLoRAConfig) -> int:
        return sum(cfg.r * (s.d_in + s.d_out) for s in sites)
