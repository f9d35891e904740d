"""IA³: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022).

A learned vector scales each adapted layer per channel: the output (keys, values: y ⊙ l, the
bias scaled with it, as in peft) or, on the modules listed in ``feedforward``, the input (the
FFN's second matrix: W·(x ⊙ l) + b). l starts at 1, so the model is unchanged at step 0.
ΔW = W·(l − 1) per row or per column, and Δb = b·(l − 1) on output-scaled layers: both are
exported as dense deltas and merged exactly. On a frozen ``nn.Linear`` the scaling and the
layer are one autograd function (:class:`_ScaledLinear`): an input-scaled layer scales W's
columns (d_out·d_in products) instead of the activations (batch·d_in), an output-scaled one
passes x's gradient through W with its rows scaled instead of scaling the activations'
gradient; both keep what autograd would (x, or the unscaled output), so memory is unchanged.
Trainable parameters: d_out per output-scaled matrix, d_in (input channels) per feed-forward
one.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.errors import SpliceError

from ._sites import Site, frozen_linear
from .layer import METHODS, Adapter, Method, MethodConfig


class IA3Config(MethodConfig):
    dropout: float = pydantic.Field(0.0, ge=0.0, le=0.0, description="IA³ has no dropout")
    feedforward: list[str] = pydantic.Field(
        default_factory=list,
        description="module-name suffixes among the targets whose input is scaled (FFN)",
    )


class _ScaledLinear(torch.autograd.Function):
    """IA³ on a frozen Linear: x·(W ⊙ v)ᵀ + b (``inputs``: v scales x's channels, i.e. W's
    columns) or (x·Wᵀ + b) ⊙ v (outputs, the bias scaled with them)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, v: Tensor, w: Tensor, b: Tensor | None, inputs: bool):
        ctx.inputs = inputs
        if inputs:
            ctx.save_for_backward(x, v, w)
            return F.linear(x, w * v, b)
        y = F.linear(x, w, b)
        ctx.save_for_backward(y, v, w)
        return y * v

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        kept, v, w = ctx.saved_tensors  # x (inputs), or the unscaled output
        need_x, need_v = ctx.needs_input_grad[:2]
        # one 2-D GEMM, as the layer's own backward: torch.matmul on a non-contiguous 3-D g
        # (attention's key/value gradients) would run a batched GEMM over a broadcast W. W in
        # g's dtype: under autocast g is the forward's bf16 and the backward may run without
        # autocast (fp32 W would raise); autograd casts each gradient to its input's dtype
        g2, n, w = g.reshape(-1, g.shape[-1]), v.numel(), w.to(g.dtype)
        gx = gv = None
        if ctx.inputs:
            gxv = g2 @ w  # ∂L/∂(x ⊙ v)
            gv = (gxv * kept.reshape(-1, n)).sum(0) if need_v else None
            gx = gxv.mul_(v).view(kept.shape) if need_x else None  # in place: gxv is ours
        else:
            gv = (g2 * kept.reshape(-1, n)).sum(0) if need_v else None
            if need_x:
                gx = (g2 @ (w * v[:, None]).to(g.dtype)).view(*g.shape[:-1], w.shape[1])
        return gx, gv, None, None, None


def _in_channels(site: Site) -> int:
    return site.weight_shape[1] if site.kind == "conv" else site.d_in


def _is_feedforward(site: Site, cfg: IA3Config) -> bool:
    return any(site.name == f or site.name.endswith("." + f) for f in cfg.feedforward)


class IA3Adapter(Adapter):
    reads_base = True

    def __init__(self, site: Site, feedforward: bool) -> None:
        super().__init__(site, 1.0)
        self.feedforward = self.wraps_base = feedforward
        self.fuses_base = site.kind == "linear"  # alone, a Linear runs the fused function
        self.ia3_l = nn.Parameter(torch.ones(_in_channels(site) if feedforward else site.d_out))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y * self.site.per_out(self.ia3_l, y)

    def around(self, base: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not args and not kwargs and frozen_linear(base, x, self.ia3_l):
            return _ScaledLinear.apply(x, self.ia3_l, base.weight, base.bias, self.feedforward)
        if not self.feedforward:
            return self.forward(x, base(x, *args, **kwargs))
        return base(x * self.site.per_out(self.ia3_l, x), *args, **kwargs)

    def _factor(self) -> Tensor:
        """l over the canonical (d_out, d_in) weight: a column, or a row (kernel-repeated)."""
        lv = self.ia3_l.detach().float()
        if not self.feedforward:
            return lv[:, None]
        return lv.repeat_interleave(self.site.d_in // lv.numel())[None, :]

    def merged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_w = self.site.stored(self.site.canonical(w) * self._factor())
        if b is None or self.feedforward:
            return new_w, b
        return new_w, b * self.ia3_l.detach().float()

    def unmerged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_w = self.site.stored(self.site.canonical(w) / self._factor())
        if b is None or self.feedforward:
            return new_w, b
        return new_w, b / self.ia3_l.detach().float()


@METHODS.register("ia3")
class IA3(Method):
    pretty_name = "IA³"
    reference_url = "https://arxiv.org/abs/2205.05638"
    family = "additive"
    Config = IA3Config
    kinds = frozenset({"linear", "conv1d_gpt2", "conv"})
    lowrank = False  # a per-channel rescaling of W: exported as a dense delta

    peft_type = "IA3"
    peft_tensors = ("ia3_l",)

    def to_peft(self, cfg: IA3Config, sites: list[Site]) -> dict[str, Any]:
        return {"feedforward_modules": [s.name for s in sites if _is_feedforward(s, cfg)]}

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        return {"feedforward": list(fields.pop("feedforward_modules", None) or [])}

    def peft_shape(self, adapter: Adapter, name: str) -> tuple[int, ...] | None:
        n, site = adapter.ia3_l.numel(), adapter.site
        if site.kind == "conv":
            return (1, n, *[1] * (len(site.weight_shape) - 2))
        return (1, n) if adapter.feedforward else (n, 1)

    def build(self, sites: list[Site], cfg: IA3Config) -> list[Adapter]:
        for f in cfg.feedforward:
            if not any(s.name == f or s.name.endswith("." + f) for s in sites):
                raise SpliceError(
                    f"ia3 feedforward module {f!r} is not among the adapted layers",
                    fix="list feed-forward modules that the targets also match",
                )
        return [IA3Adapter(site, _is_feedforward(site, cfg)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: IA3Config) -> int:
        return sum(_in_channels(s) if _is_feedforward(s, cfg) else s.d_out for s in sites)
