"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023; peft ≥ 0.17's input-side layout).

The input is rotated block by block before the frozen layer: y = W·(R x) + b with R
block-diagonal, d_in/``block_size`` blocks (one shared block with ``block_share``). Each block
is the Cayley transform of a skew-symmetric Q (its b(b−1)/2 upper entries train), either
exactly, (I − Q)(I + Q)⁻¹, or as peft computes it by default, by the Neumann series
I + 2Q + 2Q² + … + Q^{n−1} (``neumann_terms`` = n; as in peft, n = 2 gives I + 2Q and n = 3
the same series as n = 4). COFT (``constrained``) projects each Q
into the ball ‖Q‖ ≤ ε/√blocks (peft overwrites the parameter with the projection at each
forward; splice projects functionally, gradients passed straight through, so the delta and
the forward always agree). Q = 0 at init: R = I, the model is unchanged. On a frozen Linear
(or GPT-2 Conv1D) called alone on at least d_out tokens, the rotation and the layer are one
autograd function
(:class:`_RotatedLinear`): the blocks rotate W's column groups, W·blockdiag(R)ᵀ (d_out·d_in·b
products), instead of the activations (tokens·d_in·b: 5.3× more at MiniLM's 384 outputs and
2,048 tokens), and the backward passes g·W through the rotation's. Elsewhere the rotation is its own
function (:class:`_BlockRotate`) before the layer. Either way every product is a batched GEMM
on strided views (no permuted copy of the input in the forward or for R's gradient), and x itself
is kept for the backward — one tensor for all the adapted layers that read the same input (query
and value) — where einsum's autograd (and peft) keep a permuted copy per layer. Merged:
W' = W·Rᵀ (unmerged with the blocks' inverses); ΔW = W·(Rᵀ − I) is dense.
Trainable parameters: blocks·b(b−1)/2 per adapted matrix (b(b−1)/2 when shared).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.errors import SpliceError

from ._sites import Site, frozen_linear
from .layer import METHODS, Adapter, Method, MethodConfig


class OFTConfig(MethodConfig):
    dropout: float = pydantic.Field(0.0, ge=0.0, le=0.0, description="OFT has no input dropout")
    # not a --budget size knob (no declared bound): only the divisors of the width build
    block_size: int = pydantic.Field(32, description="size of each orthogonal block (≥ 2)")
    block_share: bool = pydantic.Field(False, description="one block for the whole layer")
    neumann: bool = pydantic.Field(True, description="Cayley by the Neumann series (peft's)")
    neumann_terms: int = pydantic.Field(5, gt=0, description="terms of the Neumann series")
    constrained: bool = pydantic.Field(False, description="COFT: keep ‖Q‖ ≤ eps")
    eps: float = pydantic.Field(6e-5, gt=0, description="COFT radius")


def _times_blocks(t: Tensor, blocks: Tensor) -> Tensor:
    """t·blockdiag(blocks): row r of each (n, b) view of t times blocks[r], one ``bmm`` from a
    strided view of t into a strided view of the result (no permuted copy of either)."""
    n, b = blocks.shape[0], blocks.shape[1]
    out = t.new_empty(t.shape)
    torch.bmm(t.reshape(-1, n, b).transpose(0, 1), blocks, out=out.view(-1, n, b).transpose(0, 1))
    return out


def _rotation_grads(ctx: Any, x: Tensor, blocks: Tensor, g: Tensor) -> tuple[Tensor | None, ...]:
    """(∂L/∂x, ∂L/∂blocks) of x·blockdiag(blocks) from ``g`` = ∂L/∂(x·blockdiag(blocks)), each
    wanted one (``ctx.needs_input_grad[:2]``) a ``bmm`` over strided views."""
    n, b = blocks.shape[0], blocks.shape[1]
    gx = _times_blocks(g, blocks.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    gblocks = None
    if ctx.needs_input_grad[1]:  # Σ_N xᵀ·g per block
        gblocks = torch.bmm(
            x.reshape(-1, n, b).permute(1, 2, 0), g.reshape(-1, n, b).transpose(0, 1)
        )
    return gx, gblocks


class _BlockRotate(torch.autograd.Function):
    """x ↦ x·blockdiag(R): row r of each (n, b) view of x times R[r], for R (n, b, b).

    Saves x and R only; every product is a ``bmm`` over the n blocks of a strided view."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: Tensor) -> Tensor:
        ctx.save_for_backward(x, blocks)
        return _times_blocks(x, blocks)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, blocks = ctx.saved_tensors
        return _rotation_grads(ctx, x, blocks, g)


class _RotatedLinear(torch.autograd.Function):
    """A frozen linear layer on the rotated input, (x·blockdiag(R))·Wᵀ + b, computed as
    x·(W·blockdiag(R)ᵀ)ᵀ + b: the blocks rotate W's column groups (d_out·d_in·b products)
    instead of the activations (tokens·d_in·b), and no rotated copy of x is made. The backward
    takes ∂L/∂(x·blockdiag(R)) = g·W (the GEMM the frozen layer's own backward does) through
    the rotation's. Saves x, R and W (the layer's own tensor), as the unfused pair does."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, blocks, w)
        return F.linear(x, _times_blocks(w, blocks.transpose(1, 2)), bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        # in the forward's compute dtype (autocast's bf16 F.linear, which the backward may run
        # without); autograd casts each gradient back to its input's dtype
        x, blocks, w = (t.to(g.dtype) for t in ctx.saved_tensors)
        return *_rotation_grads(ctx, x, blocks, torch.matmul(g, w)), None, None


def _blocks(site: Site, cfg: OFTConfig) -> int:
    if cfg.block_size < 2 or site.d_in % cfg.block_size:
        raise SpliceError(
            f"oft block_size={cfg.block_size} is not ≥ 2 or does not divide the input size "
            f"{site.d_in}",
            where=site.name,
            fix="pick a block_size that divides every adapted layer's input size",
        )
    return 1 if cfg.block_share else site.d_in // cfg.block_size


class OFTAdapter(Adapter):
    reads_base = True
    wraps_base = True

    def __init__(self, site: Site, cfg: OFTConfig) -> None:
        super().__init__(site, 1.0)
        self.cfg = cfg
        b = cfg.block_size
        self.oft_R = nn.Parameter(torch.zeros(_blocks(site, cfg), b * (b - 1) // 2))
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, vec: Tensor) -> Tensor:
        b = self.cfg.block_size
        q = vec.new_zeros(vec.shape[0], b, b)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(1, 2)

    def rotation(self) -> Tensor:
        """The blocks of R, (blocks, b, b)."""
        q = self._skew(self.oft_R)
        if self.cfg.constrained:  # the projected value, the gradient passed straight through
            q = q + (self._project(q.detach()) - q).detach()
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
        if not self.cfg.neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        r, terms = eye.clone(), self.cfg.neumann_terms
        if terms <= 2:  # peft's: I, or I + 2Q
            return r.add_(q, alpha=2.0) if terms == 2 else r
        last = max(3, terms - 1)  # peft's: 3 terms give the 4-term series
        power = q
        r.add_(q, alpha=2.0)  # k = 1 (last ≥ 3)
        for k in range(2, last + 1):
            power = torch.bmm(power, q)
            r.add_(power, alpha=2.0 if k < last else 1.0)
        return r

    def _project(self, q: Tensor) -> Tensor:
        """COFT: ε'·Q/‖Q‖ where ‖Q‖ > ε' = ε/√blocks (peft's projection, which peft writes
        back into the parameter at each forward; here it is a function of it)."""
        eps = self.cfg.eps / q.shape[0] ** 0.5
        norm = q.norm(dim=(1, 2), keepdim=True)
        return torch.where(norm <= eps, q, eps * q / norm)

    def _expanded(self, blocks: Tensor, dtype: torch.dtype) -> Tensor:
        n = self.site.d_in // self.cfg.block_size
        return (blocks if blocks.shape[0] == n else blocks.expand(n, -1, -1)).to(dtype)

    def around(self, base: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        blocks = self._expanded(self.rotation(), x.dtype)
        tokens = x.numel() // self.site.d_in  # W rotated when that is fewer products
        fused = not args and not kwargs and frozen_linear(base, x, conv1d=True)
        if fused and tokens >= self.site.d_out:
            w = self.site.canonical(base.weight)
            return _RotatedLinear.apply(x, blocks, w, base.bias)
        return base(_BlockRotate.apply(x, blocks), *args, **kwargs)

    def _dense(self, inverse: bool) -> Tensor:
        blocks = self.rotation().detach().float()
        blocks = torch.linalg.inv(blocks) if inverse else blocks
        n = self.site.d_in // self.cfg.block_size
        return torch.block_diag(*blocks.expand(n, -1, -1))

    def merged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.site.stored(self.site.canonical(w) @ self._dense(False).t()), b

    def unmerged(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.site.stored(self.site.canonical(w) @ self._dense(True).t()), b


@METHODS.register("oft")
class OFT(Method):
    pretty_name = "OFT / COFT"
    reference_url = "https://arxiv.org/abs/2306.07280"
    family = "reparameterized"
    Config = OFTConfig
    kinds = frozenset({"linear", "conv1d_gpt2"})
    lowrank = False  # W·(Rᵀ − I) is dense

    peft_type = "OFT"
    peft_names: ClassVar[dict[str, str]] = {"oft_R": "oft_R.weight"}
    peft_tensors = ("oft_R.weight",)
    _fields: ClassVar[dict[str, str]] = {
        "block_size": "oft_block_size", "block_share": "block_share",
        "neumann": "use_cayley_neumann", "neumann_terms": "num_cayley_neumann_terms",
        "constrained": "coft", "eps": "eps",
    }  # fmt: skip

    def to_peft(self, cfg: OFTConfig, sites: list[Site]) -> dict[str, Any]:
        fields = {theirs: getattr(cfg, ours) for ours, theirs in self._fields.items()}
        return {**fields, "r": 0, "module_dropout": 0.0, "bias": "none"}

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        if fields.get("r"):
            raise SpliceError(
                f"PEFT OFT config field r={fields['r']} (blocks per layer, so block sizes that "
                "vary by layer) is not implemented by splice",
                fix="save the OFT adapter with oft_block_size (and r=0)",
            )
        fields.pop("r", None)
        mapped = self._fields.items()
        return {ours: fields.pop(theirs) for ours, theirs in mapped if theirs in fields}

    def build(self, sites: list[Site], cfg: OFTConfig) -> list[Adapter]:
        return [OFTAdapter(site, cfg) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: OFTConfig) -> int:
        b = cfg.block_size  # the formula only: build() refuses a b that does not divide d_in
        blocks = [1 if cfg.block_share else s.d_in // b for s in sites]
        return sum(n * b * (b - 1) // 2 for n in blocks)
