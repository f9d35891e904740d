"""HyperAlign — a hypernetwork that emits the denoiser's LoRA per sample and per sampling step
(Xie, Guo, Gong, arXiv 2601.15968; spec peft.md §20 and its errata). [recon]

``h_ψ(x_t, t, c)`` reads the current latent, timestep and condition through a *perception
encoder* — a frozen copy of the pretrained denoiser's token embedding and first blocks (the
paper's U-Net down blocks) — projects the tokens, lets learned queries (initialised at zero,
errata) cross-attend to them, and a linear head emits a code ``z ∈ R^K`` per sample.

The emitted LoRA factors are linear in that code: for every target layer m,
``B_m(z) = [z_1·B_m1 | … | z_K·B_mK]`` and ``A_m = [A_m1; …; A_mK]``, i.e.
``ΔW_m(z)·x = Σ_k z_k·s·B_mk·A_mk·x`` — a per-row LoRA of rank K·r. That is exactly a per-row
weighted set of K LoRA "atoms", so it runs on the adapter framework's mixed-batch mechanism
(:class:`~splice.adapters.Rows` with per-row ``weights``): each atom is a named ``lora`` adapter
of the denoiser, and no per-sample weight matrix is materialised. The head's weight and the
atoms' factors are the hypernetwork's output layer, trained end to end.

The head starts at zero, so an untrained HyperAlign samples exactly as the base model (same
seed, same samples). Variants (errata names): ``"step"`` (S, call h every step),
``"piece"`` (P, call h every ``every`` steps and reuse the code in between) and ``"once"``
(I, call h at the first step only). Targets, rank, K, the encoder depth and the training
objective (reward + a regulariser toward the base model, in :mod:`splice.bench.domains.diffusion`)
are ours: the paper's rank, target set and L_G are unknown.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from splice.adapters import Rows, add_adapter, disable_adapters, mixed_batch
from splice.domains.backbones.ddpm import Denoiser, Eps, check_classes
from splice.errors import SpliceError

__all__ = ["TARGETS", "HyperAlign", "HyperNetwork"]

TARGETS = ("q", "k", "v", "proj")  # the attention linears of every denoiser block
Variant = Literal["step", "piece", "once"]


class _Perception(nn.Module):
    """Frozen copy of the denoiser's token embedding and its first ``blocks`` blocks."""

    def __init__(self, denoiser: Denoiser, blocks: int) -> None:
        super().__init__()
        self.denoiser = copy.deepcopy(denoiser)
        self.denoiser.blocks = self.denoiser.blocks[:blocks]
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        h = self.denoiser.tokens(x, t, c)
        for block in self.denoiser.blocks:
            h = block(h)
        return h


class HyperNetwork(nn.Module):
    """(x_t, t, c) → code (B, atoms): perception → projection → zero-init queries
    cross-attending → MLP → zero-init linear head."""

    def __init__(self, denoiser: Denoiser, atoms: int, queries: int = 4, perceive: int = 2):
        super().__init__()
        dim = denoiser.cfg.dim
        self.encoder = _Perception(denoiser, perceive)
        self.proj = nn.Linear(dim, dim)
        self.queries = nn.Parameter(torch.zeros(queries, dim))
        self.cross = nn.MultiheadAttention(dim, denoiser.cfg.heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head = nn.Linear(queries * dim, atoms)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        kv = self.proj(self.encoder(x, t, c))
        q = self.queries.expand(len(x), -1, -1)
        h = q + self.cross(q, kv, kv, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return self.head(h.flatten(1))


class HyperAlign(nn.Module):
    """The hypernetwork plus its K LoRA atoms on ``denoiser`` (adapted in place; the base
    weights are frozen and plain calls of the denoiser stay the base model)."""

    def __init__(
        self,
        denoiser: Denoiser,
        atoms: int = 4,
        r: int = 4,
        targets: Sequence[str] = TARGETS,
        variant: Variant = "step",
        every: int = 3,
        queries: int = 4,
        perceive: int = 2,
    ) -> None:
        super().__init__()
        if variant not in ("step", "piece", "once"):
            raise SpliceError(f"unknown HyperAlign variant {variant!r}", fix="step, piece or once")
        if every < 1:
            raise SpliceError(f"piece-wise interval {every} must be ≥ 1")
        self.hyper = HyperNetwork(denoiser, atoms, queries, perceive)
        self.slots = tuple(f"atom{k}" for k in range(atoms))
        for name in self.slots:
            add_adapter(denoiser, name, "lora", list(targets), r=r, alpha=float(r))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # atoms must differ and be non-zero: the head starts at zero
            for n, p in denoiser.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
        disable_adapters(denoiser)
        self.denoiser = denoiser
        self.variant, self.every = variant, every

    def calls(self, i: int) -> bool:
        """Whether sampling step ``i`` calls the hypernetwork (else it reuses the last code)."""
        if self.variant == "step":
            return True
        return i % self.every == 0 if self.variant == "piece" else i == 0

    def eps(self) -> Eps:
        """A fresh ε function for :func:`~splice.domains.backbones.ddpm.sample`: each call
        routes the batch's rows through the atoms with the (current or reused) code."""
        last: list[Tensor] = []

        def fn(x: Tensor, t: Tensor, c: Tensor, i: int) -> Tensor:
            check_classes(c, self.denoiser.cfg.classes)
            if self.calls(i) or not last:
                last[:] = [self.hyper(x, t, c)]
            with mixed_batch(self.denoiser, Rows(self.slots, weights=last[0])):
                return self.denoiser(x, t, c)

        return fn
