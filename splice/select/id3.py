"""ID³ — incremental unmasking of existing weights (Agarwal et al., TACL 2025; spec §12).

:class:`ID3` wraps any optimizer. The masked parameters start with nothing trainable; at
each of the first ``horizon`` (T) steps the wrapper scores every still-masked scalar by D³,
``H(θ) = |g| / (|θ| + ε)^β``, unmasks the global top ``⌊B/T⌋`` (one more during the first
``B mod T`` steps: the increment-S schedule, exactly B after T steps), zeroes the gradient of
every masked scalar and steps. After T the mask is frozen. Masked scalars never move: their
Adam moments stay zero, and weight decay is applied by the wrapper to unmasked entries only
(decoupled as AdamW, or L2 into the gradient), with the inner optimizer's decay set to 0.
Each entry's original value is kept when it is unmasked, so :func:`export` writes the result
as (indices, values) — O(B) — in a ``sparse`` adapter (:mod:`splice.adapters.sparse`).
Masks cost 5 bytes per maskable scalar (a bool mask for the scores, a 0/1 copy in the
parameter's dtype for the fused gradient mask and decay); scores are taken per tensor (top
``⌊B/T⌋`` each, then the global top among those), one tensor's worth of memory at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from splice.adapters import adapter_layers, inject
from splice.adapters.sparse import set_entries
from splice.errors import SpliceError

from ._common import budget_error

__all__ = ["ID3", "export"]


class ID3(torch.optim.Optimizer):
    """``optimizer`` with ID³ masks on ``params`` (name → parameter; the optimizer's other
    parameters, e.g. a new head, train in full).

    Args:
        budget: B, scalars unmasked in all (1..number of masked scalars).
        horizon: T, steps over which they are unmasked.
        eps: ε of the D³ score; exp: its β (0: gradient magnitude only).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: dict[str, nn.Parameter],
        budget: int,
        horizon: int,
        eps: float = 1e-3,
        exp: float = 0.0,
    ) -> None:
        size = sum(p.numel() for p in params.values())
        if not 0 < budget <= size:
            raise budget_error(budget, size, "maskable weights")
        if horizon <= 0:
            raise SpliceError(f"horizon {horizon} must be ≥ 1 step")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if missing := [n for n, p in params.items() if id(p) not in held]:
            raise SpliceError(f"parameter {missing[0]!r} is not in the optimizer")
        super().__init__([p for g in optimizer.param_groups for p in g["params"]], {})
        self.inner = optimizer
        self.param_groups = optimizer.param_groups  # one set of groups: schedulers see both
        self.state = optimizer.state
        self.named = dict(params)
        self.budget, self.horizon, self.eps, self.exp = budget, horizon, eps, exp
        self.t = 0
        self.masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
        self.keep = {n: torch.zeros_like(p) for n, p in params.items()}  # the masks as 0/1
        self.origin: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in params}

    def increment(self, t: int) -> int:
        """Entries unmasked at step ``t`` (increment-S: Σ over t < T is exactly B)."""
        if t >= self.horizon:
            return 0
        return self.budget // self.horizon + (1 if t < self.budget % self.horizon else 0)

    def unmasked(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @torch.no_grad()
    def _unmask(self, count: int) -> None:
        """Unmask the ``count`` highest D³ scores: each tensor's top ``count`` first, then the
        global top among those (no concatenation of every score)."""
        values, where = [], []
        for name, p in self.named.items():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            s = g.float().abs()
            if self.exp:
                s.div_((p.detach().float().abs() + self.eps).pow_(self.exp))
            s = s.masked_fill_(self.masks[name], float("-inf")).view(-1)
            top = torch.topk(s, min(count, s.numel()), sorted=False)
            values.append(top.values)
            where += [(name, top.indices)]
        best = torch.topk(torch.cat(values), count, sorted=False).indices
        start = 0
        for name, idx in where:
            n = len(idx)
            pick = idx[best[(best >= start) & (best < start + n)] - start]
            self.masks[name].view(-1)[pick] = True
            self.keep[name].view(-1)[pick] = 1
            flat = self.named[name].detach().reshape(-1)
            self.origin[name].append((pick.clone(), flat[pick].clone()))
            start += n

    @torch.no_grad()
    def _decay(self) -> list[float]:
        """Weight decay on unmasked entries only (in place, one fused pass: masked entries
        gain exactly 0); returns the groups' rates and sets them to 0 for the inner step."""
        decoupled = isinstance(self.inner, torch.optim.AdamW)
        keep = {id(p): self.keep[n] for n, p in self.named.items()}
        rates = []
        for group in self.param_groups:
            wd = group.get("weight_decay", 0.0)
            rates.append(wd)
            if not wd:
                continue
            decoupled_here = decoupled or group.get("decoupled_weight_decay", False)
            rate = group["lr"] * wd if decoupled_here else wd
            for p in group["params"]:
                if p.grad is None:
                    continue
                k = keep.get(id(p))
                target = p if decoupled_here else p.grad
                if k is not None:
                    target.addcmul_(p, k, value=-rate if decoupled_here else rate)
                elif decoupled_here:
                    p.mul_(1 - rate)  # as AdamW does
                else:
                    p.grad.add_(p, alpha=rate)
            group["weight_decay"] = 0.0
        return rates

    def step(self, closure=None):  # type: ignore[override]
        """Unmask (while t < T), mask the gradients, decay unmasked entries, step the inner."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if count := self.increment(self.t):
            self._unmask(count)
        with torch.no_grad():
            pairs = [(p.grad, self.keep[n]) for n, p in self.named.items() if p.grad is not None]
            if pairs:
                torch._foreach_mul_([g for g, _ in pairs], [k for _, k in pairs])
        rates = self._decay()
        try:
            self.inner.step()
        finally:
            for group, wd in zip(self.param_groups, rates, strict=True):
                group["weight_decay"] = wd
        self.t += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self):  # type: ignore[override]
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        self.inner.load_state_dict(state_dict)

    def changes(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """name → (flat indices sorted, original values, current values) of unmasked entries."""
        out = {}
        for name, p in self.named.items():
            if not self.origin[name]:
                continue
            idx = torch.cat([i for i, _ in self.origin[name]])
            orig = torch.cat([v for _, v in self.origin[name]])
            order = torch.argsort(idx)
            idx, orig = idx[order], orig[order]
            out[name] = (idx, orig, p.detach().reshape(-1)[idx].clone())
        return out


def export(
    model: nn.Module,
    opt: ID3,
    modules_to_save: Sequence[str] = (),
    *,
    transposed: Sequence[str] = (),
) -> nn.Module:
    """Put the masked weights back to their originals and hold the changes in a ``sparse``
    adapter: indices and values per weight, O(B). The ``params`` of ``opt`` must be the
    ``.weight`` of Linear layers (or of GPT-2 Conv1D layers, named in ``transposed``)."""
    changes = opt.changes()
    if not changes:
        raise SpliceError("ID³ unmasked nothing yet", fix="take at least one optimizer step")
    entries, canonical = {}, {}
    for name, (idx, orig, now) in changes.items():
        site = name.removesuffix(".weight")
        p = opt.named[name]
        with torch.no_grad():
            p.view(-1)[idx] = orig
        if site in transposed:  # stored (d_in, d_out) → canonical (d_out, d_in)
            d_in, d_out = p.shape
            idx = (idx % d_out) * d_in + idx // d_out
        entries[site] = len(idx)
        canonical[site] = (idx, now - orig)
    inject(model, "sparse", list(entries), entries=entries, modules_to_save=modules_to_save)
    layers = adapter_layers(model)
    for site, (idx, values) in canonical.items():
        set_entries(layers[site].adapter, idx, values)
    return model
