"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023; peft ≥ 0.17's input-side layout).

The input is rotated block by block before the frozen layer: y = W·(R x) + b with R
block-diagonal, d_in/``block_size`` blocks (one shared block with ``block_share``). Each block
is the Cayley transform of a skew-symmetric Q (its b(b−1)/2 upper entries train), either
exactly, (I − Q)(I + Q)⁻¹, or as peft computes it by default, by the Neumann series
I + 2Q + 2Q² + … + Q^{n−1} (``neumann_terms`` = n). COFT (``constrained``) projects each Q
into the ball ‖Q‖ ≤ ε/√blocks (peft overwrites the parameter with the projection at each
forward; splice projects functionally, gradients passed straight through, so the delta and
the forward always agree). Q = 0 at init: R = I, the model is unchanged. The rotation is one
autograd function (:class:`_BlockRotate`): batched GEMMs on strided views of x (no permuted
copy of the input in the forward or for R's gradient), keeping x itself for the backward —
one tensor for all the adapted layers that read the same input (query and value) — where
einsum's autograd (and peft) keep a permuted copy per layer. Merged: W' = W·Rᵀ (unmerged with
the blocks' inverses); ΔW = W·(Rᵀ − I) is dense.
Trainable parameters: blocks·b(b−1)/2 per adapted matrix (b(b−1)/2 when shared).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._sites import Site
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


class _BlockRotate(torch.autograd.Function):
    """x ↦ x·blockdiag(R): row r of each (n, b) view of x times R[r], for R (n, b, b).

    Saves x and R only; every product is a ``bmm`` over the n blocks of a strided view."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: Tensor) -> Tensor:
        ctx.save_for_backward(x, blocks)
        n, b = blocks.shape[0], blocks.shape[1]
        rows = x.reshape(-1, n, b).transpose(0, 1)  # (n, N, b), a view of x
        return torch.bmm(rows, blocks).transpose(0, 1).reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, blocks = ctx.saved_tensors
        n, b = blocks.shape[0], blocks.shape[1]
        gv = g.reshape(-1, n, b).transpose(0, 1)  # (n, N, b)
        gx = gblocks = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(gv, blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gblocks = torch.bmm(x.reshape(-1, n, b).permute(1, 2, 0), gv)  # Σ_N xᵀ·g per block
        return gx, gblocks


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
        r, power = eye.clone(), eye
        for k in range(1, self.cfg.neumann_terms):
            power = torch.bmm(power, q) if k > 1 else q
            r.add_(power, alpha=2.0 if k < self.cfg.neumann_terms - 1 else 1.0)
        return r

    def _project(self, q: Tensor) -> Tensor:
        """COFT: ε'·Q/‖Q‖ where ‖Q‖ > ε' = ε/√blocks (peft's projection, which peft writes
        back into the parameter at each forward; here it is a function of it)."""
        eps = self.cfg.eps / q.shape[0] ** 0.5
        norm = q.norm(dim=(1, 2), keepdim=True)
        return torch.where(norm <= eps, q, eps * q / norm)

    def _rotate(self, x: Tensor, blocks: Tensor) -> Tensor:
        n = self.site.d_in // self.cfg.block_size
        blocks = (blocks if blocks.shape[0] == n else blocks.expand(n, -1, -1)).to(x.dtype)
        return _BlockRotate.apply(x, blocks)

    def around(self, base: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return base(self._rotate(x, self.rotation()), *args, **kwargs)

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
