"""Sparse delta: train chosen entries of existing weights — spec peft.md §22.2 P5 (``SparseDelta``).

Each site trains ``entries[site]`` scalars of its weight, ΔW = Σ_k v_k·e_{i_k}, stored as flat
indices in the canonical (d_out, d_in) layout plus their values: O(entries) on disk. Sites
named in ``lowrank`` carry a LoRA of rank ``r`` instead (SPT's structured modules, §10, with
its fixed scale 1 rather than α/r). The forward adds ``y[:, i] += v·x[:, j]`` and the backward
gives ``∂ℒ/∂v_k = Σ_tokens g[:, i_k]·x[:, j_k]``, chunked over the entries: no dense-size dW,
and no tensor of the weight's size, ever exists (the base weight is frozen). SPT (§10) and ID³
(§12, via :mod:`splice.select.id3`) save their results in this form; the indices are buffers
that the selection fills after :func:`~splice.adapters.inject` (or ``load_adapter`` reads).
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from splice.deltas import Delta, Sparse
from splice.errors import SpliceError

from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig
from .lora import LoRAAdapter, LoRAConfig

__all__ = ["SparseAdapter", "SparseConfig", "set_entries"]

CHUNK = 1 << 20  # tokens × entries per chunk of the sparse forward/backward (4 MiB in fp32)


class SparseConfig(MethodConfig):
    entries: dict[str, int] = pydantic.Field(
        {}, description="site name → number of trainable weight entries"
    )
    lowrank: list[str] = pydantic.Field([], description="sites that carry a LoRA instead")
    r: int = pydantic.Field(8, gt=0, description="rank of the LoRA sites")
    scale: float = pydantic.Field(1.0, description="output scale of the LoRA sites (SPT: 1)")


class _SparseAdd(torch.autograd.Function):
    """``x ↦ x·ΔWᵀ`` for ΔW sparse at (rows, cols); gradients for x and the values only."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, rows: Tensor, cols: Tensor, d_out: int):
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_zeros(flat.shape[0], d_out)
        step = max(1, CHUNK // max(1, flat.shape[0]))
        for s in range(0, len(values), step):
            r, c, v = rows[s : s + step], cols[s : s + step], values[s : s + step]
            out.index_add_(1, r, flat[:, c] * v.to(flat.dtype))
        ctx.save_for_backward(x, values, rows, cols)
        return out.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, values, rows, cols = ctx.saved_tensors
        flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        gv = torch.empty_like(values) if ctx.needs_input_grad[1] else None
        gx = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        step = max(1, CHUNK // max(1, flat.shape[0]))
        for s in range(0, len(values), step):
            r, c = rows[s : s + step], cols[s : s + step]
            gr = g[:, r]  # (tokens, chunk)
            if gv is not None:
                gv[s : s + step] = (gr * flat[:, c]).sum(0).to(values.dtype)
            if gx is not None:
                gx.index_add_(1, c, gr * values[s : s + step].to(gr.dtype))
        return (None if gx is None else gx.view(x.shape)), gv, None, None, None


class SparseAdapter(Adapter):
    """``n`` trainable entries of one site's weight (zero-initialised values); the indices
    start as the first ``n`` until :func:`set_entries` (or a loaded file) sets them."""

    def __init__(self, site: Site, n: int) -> None:
        super().__init__(site, 1.0)
        if not 0 <= n <= site.d_in * site.d_out:
            raise SpliceError(
                f"{n} sparse entries do not fit a {site.d_out}×{site.d_in} weight",
                where=site.name,
                fix=f"choose 0..{site.d_in * site.d_out}",
            )
        self.register_buffer("indices", torch.arange(n, dtype=torch.int64))
        self.values = nn.Parameter(torch.zeros(n))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        idx = self.indices
        rows, cols = idx // self.site.d_in, idx % self.site.d_in
        return y + _SparseAdd.apply(x, self.values, rows, cols, self.site.d_out).to(y.dtype)

    def delta(self) -> Delta:
        idx, d_in, d_out = self.indices, self.site.d_in, self.site.d_out
        if self.site.kind == "conv1d_gpt2":  # stored (d_in, d_out)
            idx = (idx % d_in) * d_out + idx // d_in
        return Sparse(idx.clone(), self.values.detach().clone(), self.site.weight_shape)


def set_entries(adapter: SparseAdapter, indices: Tensor, values: Tensor | None = None) -> None:
    """Fill a sparse site's chosen flat indices (canonical (d_out, d_in) layout) and values.

    Raises:
        SpliceError: a count or range that does not fit the site.
    """
    site, n = adapter.site, adapter.indices.numel()
    if indices.numel() != n or (values is not None and values.numel() != n):
        raise SpliceError(f"{n} entries expected, got {indices.numel()}", where=site.name)
    if n and (int(indices.min()) < 0 or int(indices.max()) >= site.d_in * site.d_out):
        raise SpliceError(f"index out of range 0..{site.d_in * site.d_out - 1}", where=site.name)
    with torch.no_grad():
        adapter.indices.copy_(indices.reshape(-1))
        adapter.values.copy_(torch.zeros(n) if values is None else values.reshape(-1))


@METHODS.register("sparse")
class SparseDeltaMethod(Method):
    pretty_name = "Sparse delta (SPT unstructured / ID³ export)"
    reference_url = "https://arxiv.org/abs/2303.08566"
    family = "selective"
    selected_by = ("spt", "id3")
    Config = SparseConfig
    kinds = frozenset({"linear", "conv1d_gpt2"})
    lowrank = False

    def build(self, sites: list[Site], cfg: SparseConfig) -> list[Adapter]:
        lora = LoRAConfig(r=cfg.r, alpha=cfg.scale * cfg.r, dropout=cfg.dropout)
        out: list[Adapter] = []
        for site in sites:
            if site.name in cfg.lowrank:
                out.append(LoRAAdapter(site, lora))
            elif site.name in cfg.entries:
                out.append(SparseAdapter(site, cfg.entries[site.name]))
            else:
                raise SpliceError(
                    "site has neither sparse entries nor a LoRA",
                    where=site.name,
                    fix="list it in entries or lowrank, or drop it from the targets",
                )
        return out

    def num_parameters(self, sites: list[Site], cfg: SparseConfig) -> int:
        return sum(
            cfg.r * (s.d_in + s.d_out) if s.name in cfg.lowrank else cfg.entries.get(s.name, 0)
            for s in sites
        )
