"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al., ICLR 2023) — peft's layout.

ΔW = s·P·diag(Λ)·Q in SVD form: Q = ``lora_A`` (r, d_in), P = ``lora_B`` (d_out, r), Λ =
``lora_E`` (r); A, B ~ N(0, 0.02²), Λ = 0 (ΔW = 0 at init); s = α/(r + 1e-5) with r the
initial rank (peft's ``ranknum``). Training, through the one loop's step hook
(:meth:`Method.after_step`, which ``TrainStep`` calls after each optimizer step): the
sensitivity |θ·∇θ| of every entry is smoothed (β₁) with its uncertainty (β₂); a triplet's
score is its Λ entry's plus the mean of its row of A and column of B; the total rank budget
falls from Σr to ``target_r``·sites on a cubic schedule between ``tinit`` and
``total_step − tfinal``, and every ``deltaT`` steps the lowest-scored triplets' Λ are zeroed.
The orthogonality regulariser ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F (mean over matrices, weight
``orth_reg_weight``) is the method's auxiliary loss. Trainable parameters: r·(d_in + d_out + 1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig


class AdaLoRAConfig(MethodConfig):
    r: int = pydantic.Field(12, gt=0, description="initial rank of every site (peft's init_r)")
    target_r: int = pydantic.Field(8, gt=0, description="mean rank left after pruning")
    alpha: float = pydantic.Field(8.0, description="scale numerator: s = alpha/r")
    total_step: int | None = pydantic.Field(None, gt=0, description="steps of the run")
    tinit: int = pydantic.Field(0, ge=0, description="steps before pruning starts")
    tfinal: int = pydantic.Field(0, ge=0, description="steps at the final budget")
    deltaT: int = pydantic.Field(1, gt=0, description="steps between two prunings")
    beta1: float = pydantic.Field(0.85, gt=0, lt=1, description="sensitivity smoothing")
    beta2: float = pydantic.Field(0.85, gt=0, lt=1, description="uncertainty smoothing")
    orth_reg_weight: float = pydantic.Field(0.5, ge=0, description="orthogonality loss weight")


def budget_schedule(cfg: AdaLoRAConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """(rank budget, whether to prune now) at ``step``: cubic decay from ``initial``."""
    if cfg.total_step is None or step <= cfg.tinit:
        return initial, False
    if step > cfg.total_step - cfg.tfinal:
        return target, True
    left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    return int((initial - target) * left**3 + target), step % cfg.deltaT == 0


class AdaLoRAAdapter(Adapter):
    def __init__(self, site: Site, cfg: AdaLoRAConfig) -> None:
        super().__init__(site, cfg.alpha / (cfg.r + 1e-5), cfg.dropout)
        self.lora_A = nn.Parameter(torch.randn(cfg.r, site.d_in) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(site.d_out, cfg.r) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(cfg.r))
        self.kept: Tensor | None = None  # the final pattern, once the budget is reached
        self._ema: dict[str, tuple[Tensor, Tensor]] = {}

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A * self.lora_E[:, None]

    def track(self, beta1: float, beta2: float) -> None:
        """Update the smoothed sensitivity and uncertainty of A, B and Λ from their grads."""
        for name in ("lora_A", "lora_B", "lora_E"):
            p = getattr(self, name)
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs().detach()
            avg, unc = self._ema.get(name, (torch.zeros_like(ipt), torch.zeros_like(ipt)))
            avg = beta1 * avg + (1 - beta1) * ipt
            self._ema[name] = (avg, beta2 * unc + (1 - beta2) * (ipt - avg).abs())

    def scores(self) -> Tensor:
        """Each triplet's importance: s(Λ_i) + mean s(A_i,:) + mean s(B_:,i), s = avg·unc."""
        s = {name: avg * unc for name, (avg, unc) in self._ema.items()}
        if len(s) < 3:
            return torch.zeros_like(self.lora_E)
        return s["lora_E"] + s["lora_A"].mean(1) + s["lora_B"].mean(0)


@METHODS.register("adalora")
class AdaLoRA(Method):
    pretty_name = "AdaLoRA"
    reference_url = "https://arxiv.org/abs/2303.10512"
    family = "reparameterized"
    Config = AdaLoRAConfig
    kinds = frozenset({"linear", "conv1d_gpt2"})

    peft_type = "ADALORA"
    peft_tensors = ("lora_A", "lora_B", "lora_E")
    _fields: ClassVar[dict[str, str]] = {
        "r": "init_r", "target_r": "target_r", "alpha": "lora_alpha", "total_step": "total_step",
        "tinit": "tinit", "tfinal": "tfinal", "deltaT": "deltaT", "beta1": "beta1",
        "beta2": "beta2", "orth_reg_weight": "orth_reg_weight", "dropout": "lora_dropout",
    }  # fmt: skip

    def to_peft(self, cfg: AdaLoRAConfig, sites: list[Site]) -> dict[str, Any]:
        fields = {theirs: getattr(cfg, ours) for ours, theirs in self._fields.items()}
        # peft insists on a schedule; one that has ended changes nothing when loading
        fields["total_step"] = cfg.total_step or cfg.tinit + cfg.tfinal + 1
        return {**fields, "r": cfg.r, "rank_pattern": None, "bias": "none"}

    def from_peft(self, fields: dict[str, Any], shared: dict[str, Tensor]) -> dict[str, Any]:
        mapped = self._fields.items()
        options = {ours: fields.pop(theirs) for ours, theirs in mapped if theirs in fields}
        for unused in ("r", "rank_pattern", "lora_alpha"):  # LoraConfig's r: not AdaLoRA's
            fields.pop(unused, None)
        return options

    def peft_shape(self, adapter: Adapter, name: str) -> tuple[int, ...] | None:
        return (adapter.lora_E.numel(), 1) if name == "lora_E" else None

    def peft_state(self, state: dict[str, Tensor], config: dict[str, Any]) -> None:
        """peft drops pruned triplets from the file (``rank_pattern``): put them back as 0."""
        for name, keep in (config.get("rank_pattern") or {}).items():
            site = name.removesuffix(".lora_E").removeprefix("model.")
            kept = torch.tensor(keep, dtype=torch.bool)
            for part, dim in (("lora_A", 0), ("lora_B", 1), ("lora_E", 0)):
                key = f"{site}.adapter.{part}"
                stored = state[key]
                shape = list(stored.shape)
                shape[dim] = kept.numel()
                full = stored.new_zeros(shape)
                full[(slice(None),) * dim + (kept,)] = stored
                state[key] = full

    def build(self, sites: list[Site], cfg: AdaLoRAConfig) -> list[Adapter]:
        return [AdaLoRAAdapter(site, cfg) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: AdaLoRAConfig) -> int:
        return sum(cfg.r * (s.d_in + s.d_out + 1) for s in sites)

    def aux_loss(self, adapters: list[Adapter], cfg: AdaLoRAConfig) -> Tensor | None:
        if cfg.orth_reg_weight == 0:
            return None
        total = 0.0
        for a in adapters:
            for gram in (a.lora_A @ a.lora_A.t(), a.lora_B.t() @ a.lora_B):
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                total = total + torch.linalg.matrix_norm(gram - eye)
        return cfg.orth_reg_weight * total / (2 * len(adapters))

    def after_step(self, adapters: list[Adapter], cfg: AdaLoRAConfig, step: int) -> None:
        """Rank allocation after optimizer step ``step`` (gradients still present)."""
        if cfg.total_step is None:
            return
        final = cfg.total_step - cfg.tfinal
        initial = sum(a.lora_E.numel() for a in adapters)
        with torch.no_grad():
            if step > final and adapters[0].kept is not None:
                for a in adapters:  # past the final pruning: hold the pattern
                    a.lora_E.mul_(a.kept)
                return
            budget, prune = budget_schedule(cfg, step, initial, cfg.target_r * len(adapters))
            if step < final:
                for a in adapters:
                    a.track(cfg.beta1, cfg.beta2)
            if not (prune or step == final) or budget >= initial:
                return
            scores = [a.scores() for a in adapters]
            threshold = torch.cat(scores).kthvalue(initial - budget).values
            for a, s in zip(adapters, scores, strict=True):
                a.lora_E.masked_fill_(s <= threshold, 0.0)
                if step >= final:
                    a.kept = (s > threshold).to(a.lora_E.dtype)
