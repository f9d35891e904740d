"""Share — one evolving LoRA subspace for continual learning (Kaushik, Vaidya et al., 2026),
spec peft.md §7.

Per adapted matrix: frozen orthonormal bases ``C_A`` (d_in, k), ``C_B`` (d_out, k) and, per
task, loadings ``L_A, L_B`` (k, r):  ``Â = C_A L_A``, ``B̂ = C_B L_B``, ``ΔW = B̂ Âᵀ`` (no α/r).

1. *Subspace*: the first task trains a plain rank-r LoRA (or :meth:`Share.seed` takes t ≥ 1
   existing ones); the A-factors ``Aᵀ`` and the B-factors (α/r folded into B) are stacked
   column-wise, mean-centred across columns and the top-k left singular vectors (thin SVD)
   are the bases; ``k`` is fixed (default ``k = r``) or, with ``variance`` set, the fewest
   components reaching that share of the energy (the paper's rule, 60 %: with one rank-8
   LoRA behind the first basis it keeps 1–2 components and costs 5–14 points on the image
   sequence, docs/continual.md). The task's loadings are the projections ``C_Aᵀ Aᵀ``,
   ``C_Bᵀ B``.
2. *Task t*: bases frozen; the loadings train, with the temporary rank-update path
   ``Â += R₁ᴬR₂ᴬ`` (d_in×φ·φ×r), ``B̂ᵀ += R₁ᴮR₂ᴮ`` (r×φ·φ×d_out). A task starts from the
   previous task's loadings with ``R₁ ~ U(±0.5)`` and ``R₂ = 0`` (a library choice: ΔW
   starts at the previous task's; the released code draws loadings and both R's U(±0.5)).
3. *Merge*: every earlier task's reconstruction and the new task's *full* one (temporary
   path included) are stacked, the bases re-extracted as in 1, and every task's loadings
   re-projected analytically: ``L = C_newᵀ · factor``. ``fidelity="code"`` (the released
   code) differs in one place only: the new task's loadings are projected from its
   reconstruction *without* the temporary path, which then enters the bases alone.
   With ``refit`` > 0 the merge runs after ``1 − refit`` of the task's steps and the rest
   fine-tune the task's re-projected loadings in the new bases (step 3's optional
   fine-tuning; earlier tasks are untouched by it).
4. *Inference*: :meth:`Share.use_task` selects a task's loadings (the task id is known).

Stored after T tasks, per matrix: ``k(d_in + d_out)`` basis + ``T·2kr`` loadings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from splice._schema import Strict
from splice.adapters._primitives import scaling, uniform_parameter
from splice.adapters._sites import Site
from splice.adapters.layer import Adapter
from splice.deltas import LowRank
from splice.errors import SpliceError

from .base import CONTINUAL, ContinualMethod, Phase, Stored, count, wrap

__all__ = ["Share", "ShareConfig", "init_subspace", "merge_subspace", "principal_basis"]

Factors = tuple[Tensor, Tensor]  # (Â (d_in, r), B̂ (d_out, r))


class ShareConfig(Strict):
    r: int = pydantic.Field(8, gt=0, description="rank of every task's factors")
    alpha: float = pydantic.Field(16.0, description="first-task LoRA scale numerator (α/r)")
    k: int | None = pydantic.Field(
        None, gt=0, description="components kept; None: r, or by variance when that is set"
    )
    variance: float | None = pydantic.Field(
        None, gt=0, le=1, description="pick k as the fewest reaching this energy share (paper: 0.6)"
    )
    rank_updates: int = pydantic.Field(2, ge=0, description="φ of the temporary path; 0: off")
    fidelity: Literal["paper", "code"] = pydantic.Field(
        "paper", description="new task's loadings from the full (paper) or basis-only (code)"
    )
    refit: float = pydantic.Field(
        0.0,
        ge=0,
        lt=1,
        description="share of a task's steps that fine-tune its loadings after the merge",
    )

    def components(self) -> tuple[int | None, float]:
        """``(k, variance)`` for :func:`principal_basis`: a fixed ``k``; else the variance rule
        when ``variance`` is set; else ``k = r``."""
        if self.k is None and self.variance is not None:
            return None, self.variance
        return (self.k or self.r), 1.0


def principal_basis(stack: Tensor, k: int | None, variance: float = 0.6) -> Tensor:
    """(d, k') orthonormal columns: top left singular vectors of the column-centred ``stack``
    (d, n). ``k'`` = ``k`` (at most n), or the fewest whose energy share reaches ``variance``."""
    x = stack.double()
    x = x - x.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if k is None:
        energy = s.square()
        total = float(energy.sum())
        k = 1 if total == 0.0 else int((energy.cumsum(0) / total < variance - 1e-12).sum()) + 1
    return u[:, : min(k, u.shape[1])].float().contiguous()


def init_subspace(
    sources: Sequence[Factors], k: int | None, variance: float = 0.6
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """Bases from ``sources`` (each ``(Â (d_in, r), B̂ (d_out, r))``, scale folded into B̂) and
    each source's loadings ``(C_Aᵀ Â, C_Bᵀ B̂)``."""
    c_a = principal_basis(torch.cat([a for a, _ in sources], 1), k, variance)
    c_b = principal_basis(torch.cat([b for _, b in sources], 1), k, variance)
    return c_a, c_b, [(c_a.T @ a, c_b.T @ b) for a, b in sources]


def merge_subspace(
    c_a: Tensor,
    c_b: Tensor,
    loadings: Mapping[str, tuple[Tensor, Tensor]],
    current: str,
    extra: Factors | None,
    k: int | None,
    variance: float = 0.6,
    fidelity: Literal["paper", "code"] = "paper",
) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Share's merge (§7 step 3): re-extract the bases and re-project every task.

    ``loadings[current]`` are the new task's trained loadings in the old bases; ``extra`` its
    temporary path ``(R₁ᴬR₂ᴬ, (R₁ᴮR₂ᴮ)ᵀ)`` or None. Returns the new bases and loadings.
    """
    recon = {t: (c_a @ la, c_b @ lb) for t, (la, lb) in loadings.items()}
    full = dict(recon)
    if extra is not None:
        a, b = recon[current]
        full[current] = (a + extra[0], b + extra[1])
    new_a = principal_basis(torch.cat([a for a, _ in full.values()], 1), k, variance)
    new_b = principal_basis(torch.cat([b for _, b in full.values()], 1), k, variance)
    source = dict(full)
    if fidelity == "code":
        source[current] = recon[current]
    out = {t: (new_a.T @ a, new_b.T @ b) for t, (a, b) in source.items()}
    return new_a, new_b, out


class ShareAdapter(Adapter):
    """One site: the bases, every task's loadings, and what the current task trains."""

    def __init__(self, site: Site, cfg: ShareConfig) -> None:
        super().__init__(site, 1.0)
        self.cfg = cfg
        self.register_buffer("C_A", torch.zeros(site.d_in, 0))
        self.register_buffer("C_B", torch.zeros(site.d_out, 0))
        self.loadings: dict[str, tuple[Tensor, Tensor]] = {}
        self.mode = "off"  # "lora" (first task), "train", or a task name (inference)
        self.lora_scale = scaling(cfg.alpha, cfg.r)
        self.trainable = nn.ParameterDict()

    def begin_lora(self) -> list[nn.Parameter]:
        """The first task: a plain LoRA (A ~ U(±1/√d_in), B = 0) that seeds the subspace."""
        dev = self.C_A.device
        self.trainable = nn.ParameterDict(
            {
                "lora_A": uniform_parameter(self.cfg.r, self.site.d_in).to(dev),
                "lora_B": nn.Parameter(torch.zeros(self.site.d_out, self.cfg.r, device=dev)),
            }
        )
        self.mode = "lora"
        return list(self.trainable.values())

    def begin_task(self, start: tuple[Tensor, Tensor]) -> list[nn.Parameter]:
        """Loadings from ``start`` and a fresh temporary path (R₁ ~ U(±0.5), R₂ = 0)."""
        dev, r, phi = self.C_A.device, self.cfg.r, self.cfg.rank_updates
        params = {"L_A": nn.Parameter(start[0].clone()), "L_B": nn.Parameter(start[1].clone())}
        if phi:
            params["R1A"] = nn.Parameter(
                torch.empty(self.site.d_in, phi, device=dev).uniform_(-0.5, 0.5)
            )
            params["R2A"] = nn.Parameter(torch.zeros(phi, r, device=dev))
            params["R1B"] = nn.Parameter(torch.empty(r, phi, device=dev).uniform_(-0.5, 0.5))
            params["R2B"] = nn.Parameter(torch.zeros(phi, self.site.d_out, device=dev))
        self.trainable = nn.ParameterDict(params)
        self.mode = "train"
        return list(self.trainable.values())

    @torch.no_grad()
    def merge(self, task: str) -> None:
        """Fold the trained task in: the first task's LoRA gives the bases (§7 step 1), a
        later task's loadings and temporary path go through the merge (step 3)."""
        c, p = self.cfg, self.trainable
        if self.mode == "lora":
            b, a = self.factors()
            self.C_A, self.C_B, ls = init_subspace([(a.T, b)], *c.components())
            self.loadings = {task: ls[0]}
        elif self.mode == "train":
            loadings = {**self.loadings, task: (p["L_A"].detach(), p["L_B"].detach())}
            self.C_A, self.C_B, self.loadings = merge_subspace(
                self.C_A, self.C_B, loadings, task, self.temporary(), *c.components(), c.fidelity
            )
        self.trainable = nn.ParameterDict()
        self.mode = task

    def begin_refit(self, task: str) -> list[nn.Parameter]:
        """After the merge: the task's loadings in the new bases train again (no temporary
        path; §7 step 3, "optionally fine-tune the new loadings")."""
        la, lb = self.loadings[task]
        self.trainable = nn.ParameterDict(
            {"L_A": nn.Parameter(la.clone()), "L_B": nn.Parameter(lb.clone())}
        )
        self.mode = "train"
        return list(self.trainable.values())

    def end_refit(self, task: str) -> None:
        p = self.trainable
        self.loadings[task] = (p["L_A"].detach().clone(), p["L_B"].detach().clone())
        self.trainable = nn.ParameterDict()
        self.mode = task

    def temporary(self) -> Factors | None:
        p = self.trainable
        if "R1A" not in p:
            return None
        return (p["R1A"] @ p["R2A"]).detach(), (p["R1B"] @ p["R2B"]).T.detach()

    def factors(self) -> tuple[Tensor, Tensor]:
        p = self.trainable
        if self.mode == "lora":
            return p["lora_B"] * self.lora_scale, p["lora_A"]
        if self.mode == "train":
            a, b = self.C_A @ p["L_A"], self.C_B @ p["L_B"]
            if "R1A" in p:
                a = a + p["R1A"] @ p["R2A"]
                b = b + (p["R1B"] @ p["R2B"]).T
            return b, a.T
        if self.mode not in self.loadings:
            raise SpliceError(f"Share has no loadings for task {self.mode!r}", where=self.site.name)
        la, lb = self.loadings[self.mode]
        return self.C_B @ lb, (self.C_A @ la).T

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.mode == "off" else super().forward(x, y)


def _lowrank_factors(delta: LowRank) -> Factors:
    """``(Â, B̂)`` of a 2-D LoRA delta with its scale folded into B̂."""
    b = delta.B.reshape(delta.B.shape[0], -1).float() * delta.scale
    a = delta.A.reshape(delta.A.shape[0], -1).float()
    return a.T.contiguous(), b


def check_sources(deltas: Mapping[str, Mapping[str, LowRank]]) -> None:
    """Share's sources must be LoRAs of one rank on one target set (else one-line errors)."""
    items = list(deltas.items())
    if not items:
        raise SpliceError("Share needs at least one source adapter", fix="pass t ≥ 1 LoRAs")
    first, ref = items[0]
    for name, d in items:
        if set(d) != set(ref):
            extra = sorted(set(d) ^ set(ref))[:3]
            raise SpliceError(
                f"Share sources {first!r} and {name!r} adapt different target sets (e.g. {extra})",
                fix="initialise Share from LoRAs trained on the same targets",
            )
        ranks = {t: x.rank for t, x in d.items() if isinstance(x, LowRank)}
        if len(ranks) != len(d):
            raise SpliceError(f"Share source {name!r} is not a LoRA (low-rank) adapter")
        for t, r in ranks.items():
            if r != ref[t].rank:
                raise SpliceError(
                    f"Share sources {first!r} and {name!r} have different ranks "
                    f"({ref[t].rank} vs {r})",
                    where=t,
                    fix="initialise Share from LoRAs of one rank",
                )


@CONTINUAL.register("share")
class Share(ContinualMethod):
    pretty_name = "Share (shared LoRA subspace)"
    reference_url = "https://arxiv.org/abs/2602.06043"
    Config = ShareConfig
    default_lr = 4e-3  # the released NLU scripts' loadings LR
    cfg: ShareConfig

    def __init__(self, cfg: ShareConfig) -> None:
        super().__init__(cfg)
        self.adapters: dict[str, ShareAdapter] = {}
        self._start: dict[str, tuple[Tensor, Tensor]] = {}  # seeded loadings for the first task
        self._refitting: str | None = None  # the task merged early and being refit

    def attach(self, model: nn.Module, targets: Sequence[str] | str) -> None:
        self.adapters = wrap(model, "share", targets, lambda s: ShareAdapter(s, self.cfg))  # type: ignore[assignment]

    def seed(self, deltas: Mapping[str, Mapping[str, LowRank]]) -> None:
        """Initialise the subspace from ``t ≥ 1`` existing LoRAs (``{source: {tensor name:
        LowRank}}``, names ``<module>.weight``); the first task starts from the last source's
        projection. Raises SpliceError for mixed ranks or target sets."""
        check_sources(deltas)
        for name, ad in self.adapters.items():
            key = f"{name}.weight"
            if key not in next(iter(deltas.values())):
                raise SpliceError("the Share sources do not adapt this module", where=key)
            src = [_lowrank_factors(d[key]) for d in deltas.values()]
            if src[0][0].shape[1] != self.cfg.r:
                raise SpliceError(
                    f"source rank {src[0][0].shape[1]} differs from Share's r={self.cfg.r}",
                    fix="set r to the sources' rank",
                )
            ad.C_A, ad.C_B, ls = init_subspace(src, *self.cfg.components())
            self._start[name] = ls[-1]

    def start_task(self, task: str) -> list[Phase]:
        params: list[nn.Parameter] = []
        for name, ad in self.adapters.items():
            if not self.tasks and name not in self._start:
                params += ad.begin_lora()
            else:
                last = ad.loadings[self.tasks[-1]] if self.tasks else self._start[name]
                params += ad.begin_task(last)
        first = Phase("lora" if not self.tasks and not self._start else "loadings", 1.0, params)
        if not self.cfg.refit:
            return [first]
        refit: list[nn.Parameter] = []

        def merge_then_refit() -> None:
            self._refitting = task
            for ad in self.adapters.values():
                ad.merge(task)
                refit.extend(ad.begin_refit(task))

        first.fraction, first.after = 1.0 - self.cfg.refit, merge_then_refit
        return [first, Phase("refit", self.cfg.refit, refit)]

    @torch.no_grad()
    def end_task(self, task: str) -> None:
        for ad in self.adapters.values():
            if self._refitting == task:  # merged after the first phase, then refit
                ad.end_refit(task)
            else:
                ad.merge(task)
        self._refitting = None
        super().end_task(task)

    def use_task(self, task: str) -> None:
        for ad in self.adapters.values():
            ad.mode = task

    def state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, ad in self.adapters.items():
            out[f"{name}.C_A"], out[f"{name}.C_B"] = ad.C_A, ad.C_B
            for i, t in enumerate(self.tasks):
                out[f"{name}.L_A.{i}"], out[f"{name}.L_B.{i}"] = ad.loadings[t]
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load_state(self, state: dict[str, Tensor], tasks: Sequence[str]) -> None:
        for name, ad in self.adapters.items():
            dev = ad.C_A.device
            ad.C_A, ad.C_B = state[f"{name}.C_A"].to(dev), state[f"{name}.C_B"].to(dev)
            ad.loadings = {
                t: (state[f"{name}.L_A.{i}"].to(dev), state[f"{name}.L_B.{i}"].to(dev))
                for i, t in enumerate(tasks)
            }
            ad.mode = tasks[-1] if tasks else "off"
        self.tasks = list(tasks)

    def stored(self) -> Stored:
        bases = [t for ad in self.adapters.values() for t in (ad.C_A, ad.C_B)]
        loads = [t for ad in self.adapters.values() for p in ad.loadings.values() for t in p]
        detail = {"basis": sum(t.numel() for t in bases), "loadings": sum(t.numel() for t in loads)}
        return count(bases + loads, detail)

    def info(self) -> dict[str, object]:
        ks = [ad.C_A.shape[1] for ad in self.adapters.values()]
        return {"k_mean": sum(ks) / max(1, len(ks)), "k_max": max(ks, default=0)}
