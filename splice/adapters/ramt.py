"""R-AMT: regularized mask tuning — binary masks over frozen weights (Zheng, Wu et al., ICCV 2023).

Spec peft.md §13. Each masked weight W₀ gets real-valued logits m (all ``init``) and is used
as W = M⊙W₀ with M = 1[m > τ] (τ < init, so M = 1 and the model is the base model at step 0);
the binariser is straight-through (∂ℒ/∂m := ∂ℒ/∂M). Under Adam the update ignores the
gradient's scale, so (init, τ) scaled by c with the lr scaled by c is the same training (the
L2 gradient m/‖m‖ and GDR's gate are scale-free too; tested): what sets the pace is
K = (init − τ)/lr, the first step at which a mask can flip (Adam moves a logit by at most about
lr per step). The released code's (0.01, 0.005) at lr 8e-5 is K = 62 of its ~1,500 steps.
[recon] The defaults (0.0625, 0.03125) give K = 31 at lr 1e-3 and 6 at 5e-3, the PEFT bench's
lr grid, whose runs are 24-32 steps long: with the earlier (0.125, 0.0625), K = 62 at 1e-3, no
mask flipped there and the row was the linear probe's; (0.01, 0.005) at 1e-3 flips masks
within 5 steps and random ones pile up (the bench's MiniLM row fell 10 points below the
probe). docs/adapters.md, "R-AMT on the PEFT track", has the flips per step. The track
picks (init, τ) with the lr on validation (:attr:`RAMT.search`: these and both halved; ties
to these), as no one K suits its tasks; a halved pair runs only where its K stays within the
row's own Ks (:meth:`RAMT.pace`: at 1e-3, K = 15.6, not at 5e-3, K = 3.1).
The loss adds λ_reg·Σ‖m‖₂ (the L2 norm, not squared; :meth:`RAMT.aux_loss`).
Gradient-dropout regularity (GDR, :class:`GradientDropout`): the teacher is the unmasked
model; the gradient g_kl of KL(teacher ‖ student) only gates the loss gradient g per
element, keeping it with probability P = ½(1 + sign(g)(g + g_kl)/(|g| + |g_kl| + 1e-8)) —
a teacher forward and a second backward per step, driven by the training loop's micro-batch
(:func:`splice.adapters.inject.guide`). Masks are stored as packed bits, one per masked
weight (plus the weight's shape).

The paper masks CLIP's image encoder (patch embedding and attention projections); splice runs
the same mechanics on any Linear or (non-grouped) Conv target, e.g. MiniLM's attention
projections and EfficientNet's pointwise convolutions. The forward subtracts the dropped part,
y − x·((1 − M)⊙W₀)ᵀ, so it costs one extra product of the weight's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.deltas import Delta, Masked
from splice.errors import SpliceError

from ._bits import pack_codes, packed_bytes, unpack_codes
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = ["GradientDropout", "RAMTAdapter", "RAMTConfig", "gdr_gate"]


class RAMTConfig(MethodConfig):
    init: float = pydantic.Field(
        0.0625, description="initial mask logit (paper 0.01 at lr 8e-5) [recon]"
    )
    threshold: float = pydantic.Field(
        0.03125, description="mask = logit > threshold (paper 0.005 at lr 8e-5) [recon]"
    )
    l2: float = pydantic.Field(1e-4, ge=0, description="λ_reg of the Σ‖m‖₂ regulariser")
    gdr: float = pydantic.Field(
        1.0, ge=0, le=1, description="λ_g of gradient-dropout regularity (0: off)"
    )
    temperature: float = pydantic.Field(1.0, gt=0, description="KL temperature of GDR")
    seed: int = pydantic.Field(0, description="seed of GDR's uniform draws")

    @pydantic.model_validator(mode="after")
    def _starts_unmasked(self) -> RAMTConfig:
        if self.init <= self.threshold:
            raise ValueError(f"init {self.init} must exceed threshold {self.threshold}")
        return self


class RAMTAdapter(Adapter):
    """Mask logits over one frozen weight (kept in the canonical (d_out, d_in) layout)."""

    def __init__(self, site: Site, cfg: RAMTConfig) -> None:
        super().__init__(site, 1.0)
        self.cfg = cfg
        self.logits = nn.Parameter(torch.full((site.d_out, site.d_in), cfg.init))
        self.off = False  # the teacher's forward (GDR): the unmasked base

    def bind(self, base_layer: nn.Module) -> None:
        # a copy: merge writes M⊙W₀ into the base weight, unmerge needs W₀ back
        w0 = base_layer.weight.detach().reshape(self.site.d_out, -1).clone()
        self.register_buffer("w0", w0, persistent=False)

    def mask(self) -> Tensor:
        """The binary mask M (float), straight-through to the logits."""
        hard = (self.logits > self.cfg.threshold).to(self.logits.dtype)
        return hard + (self.logits - self.logits.detach())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.off:
            return y
        dropped = (1 - self.mask()) * self.w0.to(self.logits.dtype)
        return y - self.site.down(x, dropped).to(y.dtype)

    def masked_weight(self) -> Tensor:
        """M⊙W₀ in the base weight's layout (masked-out entries exactly 0)."""
        keep = self.logits.detach() > self.cfg.threshold
        return torch.where(keep, self.w0, torch.zeros((), dtype=self.w0.dtype)).reshape(
            self.site.weight_shape
        )

    def delta(self) -> Delta:
        keep = (self.logits.detach() > self.cfg.threshold).reshape(self.site.weight_shape)
        return Masked(-self.w0.reshape(self.site.weight_shape), ~keep)

    def saved_tensors(self) -> dict[str, Tensor]:
        keep = self.logits.detach() > self.cfg.threshold
        return {
            "mask": pack_codes(keep.to(torch.uint8), 1),
            "shape": torch.tensor(self.site.weight_shape, dtype=torch.int64),
        }

    def load_saved(self, tensors: dict[str, Tensor], where: str) -> None:
        bits, shape = tensors["mask"], tuple(tensors["shape"].tolist())
        n = self.logits.numel()
        if shape != tuple(self.site.weight_shape) or bits.numel() != packed_bytes(n, 1):
            raise SpliceError(
                f"mask file holds {bits.numel() * 8} bits (saved for a {shape} weight); the "
                f"model's {tuple(self.site.weight_shape)} weight needs {n}",
                where=where,
                fix="load the masks into the base model they were trained on",
            )
        keep = unpack_codes(bits, 1, n).bool().reshape(self.logits.shape)
        below = 2 * self.cfg.threshold - self.cfg.init  # as far below τ as init is above
        with torch.no_grad():
            self.logits.copy_(torch.where(keep, self.cfg.init, below))


def gdr_gate(g: Tensor, g_kl: Tensor, lam: float, generator: torch.Generator | None) -> Tensor:
    """GDR: keep each element of ``g`` with P = ½(1 + sign(g)(g + g_kl)/(|g| + |g_kl| + 1e-8));
    kept elements are ``g``, dropped ones ``(1 − λ)·g``."""
    p = 0.5 * (1 + torch.sign(g) * (g + g_kl) / (g.abs() + g_kl.abs() + 1e-8))
    u = torch.rand(g.shape, generator=generator, device="cpu").to(g.device)
    return ((1 - lam) + lam * (p > u).to(g.dtype)) * g


class GradientDropout:
    """R-AMT's GDR for one model: ``with gdr.teacher(): t = forward(...)`` (the unmasked
    model), then ``gdr(student_logits, t)`` before the loop's backward: it computes the KL
    gradient (the second backward) and gates that backward's mask gradients once."""

    def __init__(self, adapters: list[RAMTAdapter], cfg: RAMTConfig) -> None:
        self.adapters, self.cfg = adapters, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)

    @contextmanager
    def teacher(self) -> Iterator[None]:
        for a in self.adapters:
            a.off = True
        try:
            with torch.no_grad():
                yield
        finally:
            for a in self.adapters:
                a.off = False

    def __call__(self, student: Tensor, teacher: Tensor) -> None:
        t = self.cfg.temperature
        kl = F.kl_div(
            F.log_softmax(student.float() / t, -1),
            F.softmax(teacher.float() / t, -1),
            reduction="batchmean",
        )
        params = [a.logits for a in self.adapters]
        grads = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
        for p, g_kl in zip(params, grads, strict=True):
            self._arm(p, torch.zeros_like(p) if g_kl is None else g_kl.detach())

    def _arm(self, p: nn.Parameter, g_kl: Tensor) -> None:
        def gate(g: Tensor) -> Tensor:
            handle.remove()
            return gdr_gate(g, g_kl, self.cfg.gdr, self.generator)

        handle = p.register_hook(gate)


@METHODS.register("ramt")
class RAMT(Method):
    pretty_name = "R-AMT (mask tuning)"
    reference_url = "https://arxiv.org/abs/2307.15049"
    family = "selective"
    Config = RAMTConfig
    kinds = frozenset({"linear", "conv"})
    lowrank = False  # ΔW = (M − 1)⊙W₀: no PEFT LoRA export
    # the PEFT track picks (init, τ) on validation with the lr: the row's own values and both
    # halved (K halved; ties go to the row's own), :func:`splice.bench.peft_rows.run_row`
    search = ({}, {"init": 0.5, "threshold": 0.5})

    @staticmethod
    def pace(options: Mapping[str, float], lr: float) -> float:
        """K = (init − τ)/lr, the first step at which a mask can flip: the PEFT track runs a
        searched (init, τ) only at the lrs where its K lies within the row's own values' Ks
        (the halved pair at 5e-3, K = 3.1, never won on validation)."""
        return (options["init"] - options["threshold"]) / lr

    def build(self, sites: list[Site], cfg: RAMTConfig) -> list[Adapter]:
        return [RAMTAdapter(site, cfg) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: RAMTConfig) -> int:
        return sum(s.d_in * s.d_out for s in sites)

    def aux_loss(self, adapters: list[Adapter], cfg: RAMTConfig) -> Tensor | None:
        if cfg.l2 == 0:
            return None
        return cfg.l2 * sum(a.logits.norm() for a in adapters)  # type: ignore[return-value]

    def guide(self, adapters: list[Adapter], cfg: RAMTConfig) -> GradientDropout | None:
        if cfg.gdr == 0:
            return None
        return GradientDropout(adapters, cfg)  # type: ignore[arg-type]
