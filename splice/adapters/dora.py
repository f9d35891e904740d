"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024).

W' = m ⊙ (W + s·B@A) / ‖W + s·B@A‖, the norm taken per output channel (peft's layout: one
magnitude per row of the (d_out, d_in) weight) and detached from the graph (paper §4.3).
m starts at ‖W‖, B at 0, so the model is unchanged at step 0. The forward never recomputes
x·W nor builds the dense W + s·B@A: with g = m/‖·‖ it is y + (g − 1)⊙(y − b) + s·h·(g⊙B)ᵀ
from the base output y (one fused pass over it: (1 − g)⊙b + g⊙y), and the squared norm
comes from the factors,
‖W_i‖² + 2s·⟨B_i, (W·Aᵀ)_i⟩ + s²·B_i(A·Aᵀ)B_iᵀ, with ‖W_i‖² cached while W is unchanged.
On a frozen ``nn.Linear`` acting alone the rescale and the layer are one autograd function
(:class:`_Rescaled`): x's gradient goes through W with its rows scaled by g (d_out·d_in
products) instead of scaling the output's gradient (batch·d_out), the same values up to rounding.
With input dropout splice applies it to the low-rank branch only (peft also drops the input of
its magnitude term); in eval both agree. ΔW is not low-rank: it is exported as a dense delta.
Trainable parameters: r·(d_in + d_out) + d_out per adapted matrix.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._sites import Site, frozen_linear
from .layer import METHODS, Adapter, Method
from .lora import LoRAAdapter, LoRAConfig


class _Rescaled(torch.autograd.Function):
    """g⊙(x·Wᵀ) + b = (1 − g)⊙b + g⊙(x·Wᵀ + b) on a frozen Linear, x's gradient as one GEMM
    through g⊙W (the rows scaled) rather than a pass scaling the output's gradient first."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, g: Tensor) -> Tensor:
        y = F.linear(x, w, b)
        ctx.save_for_backward(y, w, b, g)
        if b is None:
            return y * g
        return torch.addcmul((1 - g) * b, y, g)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, w, b, g = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # one 2-D GEMM, as the layer's own backward
        gx = gg = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ (w * g[:, None])).view(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[3]:  # ∂/∂g = y − b, summed over the rows
            gg = (g2 * y.reshape(-1, y.shape[-1])).sum(0)
            gg = gg if b is None else gg - b * g2.sum(0)
        return gx, None, None, gg


class DoRAAdapter(LoRAAdapter):
    reads_base = True

    def __init__(self, site: Site, cfg: LoRAConfig) -> None:
        super().__init__(site, cfg)
        self.fuses_base = site.kind == "linear"  # alone, a Linear runs the fused function
        self.magnitude = nn.Parameter(torch.zeros(site.d_out))
        self._w2: tuple[tuple[int, int], Tensor] | None = None
        self._merge_norm: Tensor | None = None

    def bind(self, base_layer: nn.Module) -> None:
        super().bind(base_layer)
        B, A = self.factors()
        with torch.no_grad():
            self.magnitude.copy_(self._norm(B, A))

    def _row_sq(self, w: Tensor) -> Tensor:
        """‖W_i‖² per output row, recomputed only when the base weight changes."""
        key = (w.data_ptr(), w._version)
        if self._w2 is None or self._w2[0] != key:
            self._w2 = (key, self.site.canonical(w.detach()).float().square().sum(1))
        return self._w2[1]

    def _norm(self, B: Tensor, A: Tensor) -> Tensor:
        """‖W + s·B@A‖ per output row from the factors (no dense d_out×d_in product)."""
        w = self.base()[0]
        with torch.no_grad():
            B, A = B.detach().float(), A.detach().float()
            wc = self.site.canonical(w.detach()).float()
            cross = (B * torch.mm(wc, A.t())).sum(1)
            quad = (torch.mm(B, torch.mm(A, A.t())) * B).sum(1)
            sq = self._row_sq(w) + (2 * self.scale) * cross + (self.scale**2) * quad
            return sq.clamp_min(0).sqrt()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        B, A = self.factors()
        g = self.magnitude / self._norm(B, A)
        return self._low_rank(x, self._rescale(y, g), B, A, g)

    def around(self, base: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        B, A = self.factors()
        g = self.magnitude / self._norm(B, A)
        autocast = torch.is_autocast_enabled(x.device.type)
        if args or kwargs or autocast or not frozen_linear(base, x, g):
            y = self._rescale(base(x, *args, **kwargs), g)
        else:
            y = _Rescaled.apply(x, base.weight, base.bias, g)
        return self._low_rank(x, y, B, A, g)

    def _rescale(self, y: Tensor, g: Tensor) -> Tensor:
        """g⊙(y − b) + b from the base output ``y``."""
        bias = self.base()[1]
        if bias is None:
            return y * self.site.per_out(g, y)
        # one pass over y: (1 − g)⊙b + g⊙y
        return torch.addcmul(self.site.per_out((1 - g) * bias, y), y, self.site.per_out(g, y))

    def _low_rank(self, x: Tensor, y: Tensor, B: Tensor, A: Tensor, g: Tensor) -> Tensor:
        """``y`` (already rescaled) + s·h·(g⊙B)ᵀ."""
        h = self.site.down(self.dropout(x), A)
        return self.site.up_add(y, h, B * g[:, None], self.scale)

    def merged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        B, A = (t.detach().float() for t in self.factors())
        v = self.site.canonical(w) + self.scale * (B @ A)
        self._merge_norm = v.norm(dim=1)
        g = self.magnitude.detach().float() / self._merge_norm
        return self.site.stored(v * g[:, None]), b

    def unmerged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        B, A = (t.detach().float() for t in self.factors())
        g = self.magnitude.detach().float() / self._merge_norm
        v = self.site.canonical(w) / g[:, None] - self.scale * (B @ A)
        return self.site.stored(v), b


@METHODS.register("dora")
class DoRA(Method):
    pretty_name = "DoRA"
    reference_url = "https://arxiv.org/abs/2402.09353"
    family = "reparameterized"
    Config = LoRAConfig
    kinds = frozenset({"linear", "conv1d_gpt2", "conv"})
    lowrank = False  # m/‖W + ΔW‖ rescales whole rows: exported as a dense delta

    peft_type = "DORA"  # peft: a LoRA with use_dora
    peft_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "magnitude": "lora_magnitude_vector",
    }
    peft_tensors = tuple(peft_names.values())

    def to_peft(self, cfg: LoRAConfig, sites: list[Site]) -> dict[str, Any]:
        return {"peft_type": "LORA", "use_dora": True, "r": cfg.r, "lora_alpha": cfg.alpha,
                "use_rslora": cfg.use_rslora, "lora_dropout": cfg.dropout, "bias": "none",
                "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern}  # fmt: skip

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        fields.pop("use_dora")
        keys = {"r": "r", "alpha": "lora_alpha", "use_rslora": "use_rslora"}
        keys |= {"dropout": "lora_dropout", "rank_pattern": "rank_pattern"}
        keys["alpha_pattern"] = "alpha_pattern"
        return {ours: fields.pop(theirs) for ours, theirs in keys.items() if theirs in fields}

    def peft_shape(self, adapter: Adapter, name: str) -> tuple[int, ...] | None:
        shape = adapter.site.weight_shape
        if adapter.site.kind != "conv":
            return None
        ones = (1,) * (len(shape) - 2)
        r = adapter.lora_A.shape[0]
        return {"lora_A": (r, *shape[1:]), "lora_B": (shape[0], r, *ones),
                "magnitude": (1, shape[0], *ones)}[name]  # fmt: skip

    def build(self, sites: list[Site], cfg: LoRAConfig) -> list[Adapter]:
        return [DoRAAdapter(site, cfg.at(site)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: LoRAConfig) -> int:
        return sum(cfg.at(s).r * (s.d_in + s.d_out) + s.d_out for s in sites)
