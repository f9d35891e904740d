"""iGSP — implicit gradient subspace projection (Cui, Zhou et al., arXiv 2605.19301, 2026),
spec peft.md §17. **[recon]**: only the abstract is public and the code is unreleased; this
is a reconstruction that keeps the abstract's structure (docs/continual.md says which
choices are ours).

Each adapted layer holds rank-r low-rank experts ``(A_e, B_e)`` and a router with one row
per expert; every token mixes all experts by ``g = softmax(W_r x)``:
``Δ(x) = Σ_e g_e(x)·s·B_e A_e x`` (task-agnostic: no task id at inference).

Per task:

- *Phase 1, subspace identification*: ``candidates`` new experts (A ~ U(±1/√d_in), B = 0)
  and their router rows (zero) join; earlier experts and their router rows stay frozen.
  The loss adds ``reg·R``, the subspace-constrained regulariser on the candidates' update
  outside the span of the historical experts: in ``space="function"`` (default, the errata's
  expert-output reading) ``R = mean_tokens ‖(I − UUᵀ) Δ_new(x)‖²`` with ``U`` an orthonormal
  basis of the historical experts' output span (columns of their B's); in ``"weight"``
  ``R = Σ_new ‖ΔW_e − UUᵀ ΔW_e VVᵀ‖_F²`` with ``V`` the span of their A rows. After the
  phase, candidates whose mean routing probability over the phase's tokens is below
  ``prune_below`` are removed (routing mass as the gradient-flow share).
- *Phase 2, orthogonal subspace fine-tuning*: router, historical experts and the retained
  candidates' phase-1 ``B`` are frozen and the regulariser is off; the retained candidates
  train their ``A`` and a residual ``D_e`` that enters as ``B_e + (I − UUᵀ) D_e``, so the
  residual is fit orthogonally to the historical subspace. The first task has no history:
  no regulariser, and the projection is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from splice._schema import Strict
from splice.adapters._primitives import scaling, uniform_parameter
from splice.adapters._sites import Site
from splice.adapters.layer import Adapter
from splice.errors import SpliceError

from .base import CONTINUAL, ContinualMethod, Phase, Stored, count, wrap

__all__ = ["IGSP", "IGSPConfig", "gates", "orthonormal_span"]


class IGSPConfig(Strict):
    r: int = pydantic.Field(4, gt=0, description="rank of each expert")
    alpha: float = pydantic.Field(8.0, description="scale numerator: s = alpha/r")
    candidates: int = pydantic.Field(2, gt=0, description="experts pre-expanded per task")
    space: Literal["function", "weight"] = pydantic.Field(
        "function", description="regulariser on expert outputs (function) or on ΔW (weight)"
    )
    reg: float = pydantic.Field(1.0, ge=0, description="weight of the subspace regulariser")
    prune_below: float = pydantic.Field(
        0.05, ge=0, lt=1, description="mean routing probability under which a candidate goes"
    )
    phase1: float = pydantic.Field(0.3, gt=0, lt=1, description="share of steps in phase 1")
    top_k: int | None = pydantic.Field(
        None, gt=0, description="experts per token (renormalised over them); None: all"
    )


def orthonormal_span(columns: Tensor, rtol: float = 1e-6) -> Tensor:
    """(d, q) orthonormal basis of the column span of ``columns`` (d, n); q = numerical rank."""
    if columns.shape[1] == 0:
        return columns.new_zeros(columns.shape[0], 0)
    u, s, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    keep = s > rtol * float(s.max()) if float(s.max()) > 0 else s > 0
    return u[:, keep].to(columns.dtype).contiguous()


class IGSPAdapter(Adapter):
    """One layer's experts, router rows, the historical spans and the current task's state."""

    def __init__(self, site: Site, cfg: IGSPConfig) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r))
        self.cfg = cfg
        self.A = nn.ParameterList()  # (r, d_in) each
        self.B = nn.ParameterList()  # (d_out, r) each
        self.router = nn.ParameterList()  # (d_in,) each
        self.D = nn.ParameterList()  # phase-2 residuals of the retained candidates
        self.n_old = 0  # experts [0, n_old) are historical (frozen)
        self.register_buffer("U", torch.zeros(site.d_out, 0))
        self.register_buffer("V", torch.zeros(site.d_in, 0))
        self.phase = 0  # 0: inference, 1, 2
        self.mass = torch.zeros(0)
        self.tokens = 0
        self.last_penalty: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.U.device

    def add_candidates(self, m: int) -> list[nn.Parameter]:
        dev, r = self.device, self.cfg.r
        for _ in range(m):
            self.A.append(uniform_parameter(r, self.site.d_in).to(dev))
            self.B.append(nn.Parameter(torch.zeros(self.site.d_out, r, device=dev)))
            self.router.append(nn.Parameter(torch.zeros(self.site.d_in, device=dev)))
        for p in [*self.A[: self.n_old], *self.B[: self.n_old], *self.router[: self.n_old]]:
            p.requires_grad_(False)
        self.phase, self.tokens = 1, 0
        self.mass = torch.zeros(len(self.A), device=dev)
        new = slice(self.n_old, len(self.A))
        return [*self.A[new], *self.B[new], *self.router[new]]

    def candidate_mass(self) -> float:
        """The new candidates' mean share of the routing weight over phase 1's tokens."""
        return float(self.mass[self.n_old :].sum()) / max(1, self.tokens)

    def prune(self) -> list[int]:
        """Drop candidates whose mean routing probability is below the threshold; returns
        the indices (among all experts) that were removed."""
        mean = self.mass / max(1, self.tokens)
        drop = [e for e in range(self.n_old, len(self.A)) if float(mean[e]) < self.cfg.prune_below]
        keep = [e for e in range(len(self.A)) if e not in drop]
        for name in ("A", "B", "router"):
            old = getattr(self, name)
            setattr(self, name, nn.ParameterList([old[e] for e in keep]))
        self.mass = self.mass[keep]
        return drop

    def begin_phase2(self) -> list[nn.Parameter]:
        for p in [*self.A, *self.B, *self.router]:
            p.requires_grad_(False)
        new = range(self.n_old, len(self.A))
        self.D = nn.ParameterList(
            nn.Parameter(torch.zeros(self.site.d_out, self.cfg.r, device=self.device)) for _ in new
        )
        for e in new:
            self.A[e].requires_grad_(True)
        self.phase = 2
        return [*(self.A[e] for e in new), *self.D]

    def _project_out(self, m: Tensor) -> Tensor:
        """(I − UUᵀ) m for m (d_out, ·)."""
        return m - self.U @ (self.U.T @ m) if self.U.shape[1] else m

    def expert_B(self) -> list[Tensor]:
        """Each expert's effective B (phase-2 residuals projected and added)."""
        bs = list(self.B)
        for i, d in enumerate(self.D):
            bs[self.n_old + i] = bs[self.n_old + i] + self._project_out(d)
        return bs

    def factors(self) -> tuple[Tensor, Tensor]:
        raise SpliceError(
            "iGSP routes each token to its own mix of experts, so it has no single ΔW",
            where=self.site.name,
            fix="keep the adapter unmerged",
        )

    def delta(self):
        return self.factors()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if not len(self.A):
            return y
        cd, r = self.site.channel_dim, self.cfg.r
        logits = self.site.down(x, torch.stack(list(self.router))).movedim(cd, -1).float()
        probs = gates(logits, self.cfg.top_k)  # (..., E)
        if self.training and self.phase == 1:
            with torch.no_grad():
                self.mass += probs.reshape(-1, probs.shape[-1]).sum(0)
                self.tokens += probs.numel() // probs.shape[-1]
        h = self.site.down(self.dropout(x), torch.cat(list(self.A)))  # (..., E·r) at cd
        gated = h.movedim(cd, -1) * probs.to(h.dtype).repeat_interleave(r, dim=-1)
        b_all = torch.cat(self.expert_B(), dim=1)
        self.last_penalty = None
        if self.training and self.phase == 1 and self.U.shape[1] and self.cfg.reg > 0:
            self.last_penalty = self._penalty(gated, b_all)
        return self.site.up_add(y, gated.movedim(-1, cd), b_all, self.scale)

    def _penalty(self, gated: Tensor, b_all: Tensor) -> Tensor:
        new = slice(self.n_old * self.cfg.r, None)
        if self.cfg.space == "function":
            out = gated[..., new].reshape(-1, b_all.shape[1] - new.start) @ b_all[:, new].T
            out = out * self.scale  # Δ_new(x) per token, (N, d_out)
            resid = out - (out @ self.U) @ self.U.T
            return resid.float().square().sum(-1).mean()
        return weight_penalty(self, range(self.n_old, len(self.A)))

    def penalty_of(self) -> Tensor | None:
        return self.last_penalty

    def fold(self) -> None:
        """End of task: residuals into B, every expert historical, spans recomputed."""
        with torch.no_grad():
            bs = self.expert_B()
            self.B = nn.ParameterList(nn.Parameter(b.detach().clone(), False) for b in bs)
        self.D = nn.ParameterList()
        for p in [*self.A, *self.router]:
            p.requires_grad_(False)
        self.n_old = len(self.A)
        self.refresh_spans()
        self.phase = 0

    def refresh_spans(self) -> None:
        with torch.no_grad():
            hist_b = [b for b in self.B[: self.n_old]]
            hist_a = [a.T for a in self.A[: self.n_old]]
            self.U = orthonormal_span(torch.cat(hist_b, 1) if hist_b else self.U[:, :0])
            self.V = orthonormal_span(torch.cat(hist_a, 1) if hist_a else self.V[:, :0])


def gates(logits: Tensor, top_k: int | None) -> Tensor:
    """Per-token expert weights: the softmax over all experts, or with ``top_k`` the softmax
    over each token's ``top_k`` largest logits (zero elsewhere, so no gradient reaches the
    other experts or their router rows)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits.softmax(-1)
    top, idx = logits.topk(top_k, dim=-1)  # softmax over the kept logits = p_e / Σ_top p
    return torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))


def weight_penalty(ad: IGSPAdapter, experts: Sequence[int] | range) -> Tensor:
    """Σ_e ‖ΔW_e − UUᵀ ΔW_e VVᵀ‖_F² over ``experts`` (ΔW_e = s·B_e A_e)."""
    total = ad.U.new_zeros(())
    bs = ad.expert_B()
    for e in experts:
        dw = ad.scale * bs[e] @ ad.A[e]
        inside = ad.U @ (ad.U.T @ dw @ ad.V) @ ad.V.T
        total = total + (dw - inside).square().sum()
    return total


@CONTINUAL.register("igsp")
class IGSP(ContinualMethod):
    pretty_name = "iGSP (implicit gradient subspace projection) [recon]"
    reference_url = "https://arxiv.org/abs/2605.19301"
    Config = IGSPConfig
    cfg: IGSPConfig

    def __init__(self, cfg: IGSPConfig) -> None:
        super().__init__(cfg)
        self.adapters: dict[str, IGSPAdapter] = {}
        self.pruned: dict[str, int] = {}  # task → candidates pruned over all layers
        self.new_mass: dict[str, float] = {}  # task → candidates' routing share in phase 1

    def attach(self, model: nn.Module, targets: Sequence[str] | str) -> None:
        self.adapters = wrap(model, "igsp", targets, lambda s: IGSPAdapter(s, self.cfg))  # type: ignore[assignment]

    def penalty(self) -> Tensor | None:
        terms = [p for ad in self.adapters.values() if (p := ad.penalty_of()) is not None]
        return self.cfg.reg * torch.stack(terms).sum() if terms else None

    def start_task(self, task: str) -> list[Phase]:
        params = [
            p for ad in self.adapters.values() for p in ad.add_candidates(self.cfg.candidates)
        ]
        phase2: list[nn.Parameter] = []

        def after_phase1() -> None:
            ads = self.adapters.values()
            self.new_mass[task] = round(sum(ad.candidate_mass() for ad in ads) / len(ads), 4)
            self.pruned[task] = sum(len(ad.prune()) for ad in ads)
            phase2.extend(p for ad in self.adapters.values() for p in ad.begin_phase2())

        return [
            Phase("subspace identification", self.cfg.phase1, params, self.penalty, after_phase1),
            Phase("orthogonal fine-tuning", 1 - self.cfg.phase1, phase2),
        ]

    def end_task(self, task: str) -> None:
        for ad in self.adapters.values():
            ad.fold()
        super().end_task(task)

    def state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, ad in self.adapters.items():
            for e in range(len(ad.A)):
                out[f"{name}.A.{e}"], out[f"{name}.B.{e}"] = ad.A[e], ad.B[e]
                out[f"{name}.router.{e}"] = ad.router[e]
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load_state(self, state: dict[str, Tensor], tasks: Sequence[str]) -> None:
        for name, ad in self.adapters.items():
            n = sum(1 for k in state if k.startswith(f"{name}.A."))
            for attr in ("A", "B", "router"):
                tensors = [state[f"{name}.{attr}.{e}"].to(ad.device) for e in range(n)]
                setattr(ad, attr, nn.ParameterList(nn.Parameter(t, False) for t in tensors))
            ad.n_old = n
            ad.refresh_spans()
        self.tasks = list(tasks)

    def stored(self) -> Stored:
        experts = [t for ad in self.adapters.values() for t in (*ad.A, *ad.B)]
        routers = [t for ad in self.adapters.values() for t in ad.router]
        detail = {
            "experts": sum(len(ad.A) for ad in self.adapters.values()),
            "router": sum(t.numel() for t in routers),
        }
        return count(experts + routers, detail)

    def info(self) -> dict[str, object]:
        experts = self.stored().detail["experts"]
        return {"experts": experts, "pruned": dict(self.pruned), "new_mass": dict(self.new_mass)}
