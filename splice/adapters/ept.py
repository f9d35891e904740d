"""EPT — Expert Pyramid Tuning (Zhang, Yan et al., 2026), spec peft.md §6.

Per adapted linear: a shared meta-knowledge LoRA A (r, ⌊d_in/2⌋), B (⌊d_out/2⌋, r); experts
e with kernel sizes k_e read nested slices A[:, :d_in//k_e], B[:d_out//k_e] and expand the
code with a kernel κ_e (m_e, k_e) (a grouped transposed conv of stride k_e):
ΔW_e[c·k_e + j, i] = κ_e[c, j]·(B_e A_e)[c, i]. A task router picks the top-K experts from the
task embedding τ_t: w = softmax(top-K of softmax(W_g τ_t + b_g)) as the released code does
(``routing="code"``) or the renormalised top-K (``"paper"``). Routing depends only on the task,
so ΔW_t = s·Σ_e w_e ΔW_e merges per task (:func:`set_task` chooses it). Trainable:
r(⌊d_in/2⌋ + ⌊d_out/2⌋) + Σ_e m_e k_e + E(d_in + 1) + T·d_in per module.

Defaults follow the released code (Yan-Zhenwei/EPT@54ed6ed; spec Errata): A, B and the kernels
are Kaiming-uniform (a=√5; a kernel's fan-in is m_e·k_e), so ΔW ≠ 0 at step 0; T = 8 task
slots; the task-contrastive loss is the mean over the adapted modules of the encoder (T5's
encoder stack) and absent in decoder-only models (LLaMA), where the code computes but never
adds it.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.errors import SpliceError

from ._primitives import kaiming_uniform, scaling, softmax_topk, uniform_parameter
from ._sites import Site
from .inject import adapter_layers
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = ["in_encoder", "set_task"]

TEMPERATURE = 0.05  # of the task-contrastive loss (reference code)


class EPTConfig(MethodConfig):
    r: int = pydantic.Field(8, gt=0, description="rank of the shared meta-knowledge LoRA")
    alpha: float = pydantic.Field(32.0, description="scale numerator: s = alpha/r")
    kernels: list[int] = pydantic.Field(
        [2, 2, 4, 4, 6, 6, 8, 8], min_length=1, description="kernel size k_e ≥ 2 per expert"
    )
    top_k: int = pydantic.Field(2, gt=0, description="experts used per task")
    tasks: int = pydantic.Field(8, gt=0, description="task-embedding slots T (code: 8)")
    zero_init_kernels: bool = pydantic.Field(
        False, description="κ = 0 so ΔW = 0 at start (code: Kaiming, fan-in m_e·k_e)"
    )
    routing: Literal["code", "paper"] = pydantic.Field(
        "code", description="top-K weights: softmax of probabilities (code) or renormalised"
    )
    contrastive_coef: float = pydantic.Field(0.1, ge=0.0, description="task-contrastive weight")
    contrastive_modules: Literal["encoder", "all"] = pydantic.Field(
        "encoder",
        description="modules whose first token enters the contrastive loss: those inside an"
        " encoder stack (none in decoder-only models), or every adapted module",
    )
    dropout: float = pydantic.Field(0.1, ge=0.0, lt=1.0, description="dropout on the input")

    @pydantic.field_validator("kernels")
    @classmethod
    def _kernels(cls, v: list[int]) -> list[int]:
        if min(v) < 2:
            raise ValueError("every kernel size must be ≥ 2 (experts read ⌊d/k⌋ ≤ ⌊d/2⌋)")
        return v


class EPTAdapter(Adapter):
    def __init__(self, site: Site, cfg: EPTConfig, contrastive: bool = True) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        d_in, d_out = site.d_in, site.d_out
        if d_out // max(cfg.kernels) < 1 or d_in // max(cfg.kernels) < 1:
            raise SpliceError(f"layer too small for kernel {max(cfg.kernels)}", where=site.name)
        self.cfg = cfg
        self.task = 0
        self.lora_A = uniform_parameter(cfg.r, d_in // 2)
        self.lora_B = uniform_parameter(d_out // 2, cfg.r)
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.zeros(d_out // k, k))
            if cfg.zero_init_kernels
            else uniform_parameter(d_out // k, k, fan_in=(d_out // k) * k)
            for k in cfg.kernels
        )
        self.task_embedding = nn.Parameter(torch.randn(cfg.tasks, d_in) * 0.01)
        self.gate_weight = uniform_parameter(len(cfg.kernels), d_in, a=0.0)
        self.gate_bias = nn.Parameter(kaiming_uniform(torch.empty(len(cfg.kernels)), d_in))
        self.contrastive = contrastive and cfg.contrastive_coef > 0 and cfg.tasks > 1
        self.last_first_token: Tensor | None = None

    def routing(self) -> tuple[list[int], Tensor]:
        """The top-K experts for the current task and their weights."""
        logits = self.gate_weight @ self.task_embedding[self.task] + self.gate_bias
        mode = "softmax" if self.cfg.routing == "code" else "sum"
        weights, probs = softmax_topk(logits, self.cfg.top_k, renormalize=mode)
        chosen = probs.topk(self.cfg.top_k).indices.tolist()
        return chosen, weights

    def factors(self) -> tuple[Tensor, Tensor]:
        d_in, d_out = self.site.d_in, self.site.d_out
        chosen, weights = self.routing()
        As, Bs = [], []
        for e in chosen:
            k, kappa = self.cfg.kernels[e], self.kernels[e]
            n, m = d_in // k, d_out // k
            As.append(F.pad(self.lora_A[:, :n], (0, d_in - n)))
            expanded = (kappa[:, :, None] * self.lora_B[:m, None, :]).reshape(m * k, -1)
            Bs.append(weights[e] * F.pad(expanded, (0, 0, 0, d_out - m * k)))
        return torch.cat(Bs, dim=1), torch.cat(As, dim=0)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.training and self.contrastive:
            self.last_first_token = x[:, 0] if x.dim() == 3 else x
        return super().forward(x, y)

    def contrastive_loss(self) -> Tensor:
        """CE of cos(first token, τ)/0.05 against the current task id (reference code)."""
        x0 = F.normalize(self.last_first_token.float(), dim=-1)
        sim = x0 @ F.normalize(self.task_embedding, dim=-1).t() / TEMPERATURE
        target = torch.full((sim.shape[0],), self.task, device=sim.device)
        return F.cross_entropy(sim, target)


@METHODS.register("ept")
class EPT(Method):
    pretty_name = "EPT (Expert Pyramid Tuning)"
    reference_url = "https://arxiv.org/abs/2603.12577"
    family = "hybrid"
    Config = EPTConfig
    kinds = frozenset({"linear", "conv1d_gpt2"})
    uses_all_parameters = False  # experts outside the task's top-K get no gradient

    def build(self, sites: list[Site], cfg: EPTConfig) -> list[Adapter]:
        if cfg.top_k > len(cfg.kernels):
            raise SpliceError(f"top_k={cfg.top_k} > {len(cfg.kernels)} experts", fix="lower top_k")
        every = cfg.contrastive_modules == "all"
        return [EPTAdapter(site, cfg, every or in_encoder(site.name)) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: EPTConfig) -> int:
        E = len(cfg.kernels)
        return sum(
            cfg.r * (s.d_in // 2 + s.d_out // 2)
            + sum((s.d_out // k) * k for k in cfg.kernels)
            + E * (s.d_in + 1)
            + cfg.tasks * s.d_in
            for s in sites
        )

    def aux_loss(self, adapters: list[Adapter], cfg: EPTConfig) -> Tensor | None:
        losses = [a.contrastive_loss() for a in adapters if a.last_first_token is not None]
        return cfg.contrastive_coef * torch.stack(losses).mean() if losses else None

    def task_slots(self, cfg: EPTConfig) -> int:
        return cfg.tasks

    def set_task(self, model: nn.Module, task: int) -> None:
        set_task(model, task)


def in_encoder(name: str) -> bool:
    """Whether module ``name`` sits in an encoder stack: its first ``encoder``/``decoder`` name
    component is ``encoder`` (T5, BART, BERT, ViT: ``encoder.…``; a BERT used as the decoder of
    an encoder-decoder, ``decoder.bert.encoder.…``, is not; GPT-2's ``transformer.h.…`` and
    LLaMA's ``model.layers.…`` have neither: decoder-only)."""
    stack = [part for part in name.split(".") if part in ("encoder", "decoder")]
    return bool(stack) and stack[0] == "encoder"


def set_task(model: nn.Module, task: int) -> nn.Module:
    """Route every EPT adapter (of every name) by ``task``; merged layers are re-merged with
    the task's ΔW."""
    for layer in adapter_layers(model).values():
        epts = [a for a in layer.named_adapters().values() if isinstance(a, EPTAdapter)]
        if not epts:
            continue
        for adapter in epts:
            if not 0 <= task < adapter.cfg.tasks:
                raise SpliceError(
                    f"task {task} outside 0..{adapter.cfg.tasks - 1}", fix="inject with tasks=T"
                )
        merged = layer.merged
        layer.unmerge()
        for adapter in epts:
            adapter.task = task
        if merged:
            layer.merge()
    return model
