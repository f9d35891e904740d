"""ID³ — incremental unmasking of existing weights (Agarwal et al., TACL 2025; spec §12).

:class:`ID3` wraps any optimizer. The masked parameters start with nothing trainable; at
each of the first ``horizon`` (T) steps the wrapper scores every still-masked scalar by D³,
``H(θ) = |g| / (|θ| + ε)^β``, unmasks the global top ``⌊B/T⌋`` (one more during the first
``B mod T`` steps: the increment-S schedule, exactly B after T steps), zeroes the gradient of
every masked scalar and steps. After T the mask is frozen. Masked scalars never move: their
gradient is zeroed (so Adam's first moment stays 0 and their update is exactly 0), and weight
decay is applied by the wrapper to unmasked entries only (decoupled as AdamW, or L2
into the gradient), with the inner optimizer's decay set to 0. Each entry's original value is
kept when it is unmasked, so :func:`export` writes the result as (indices, values) — O(B) — in
a ``sparse`` adapter (:mod:`splice.adapters.sparse`).

Speed (splice's choices, not the paper's; docs/select.md): the global top-k is exact without
ranking every scalar — the unmasked entries' gradients are set to 0 (they score 0), each row
of ``BLOCK`` entries gets its highest score, and the k best entries lie in the rows reaching
the k-th highest row maximum. The inner step gets a gradient tensor kept by the wrapper, 0
but at the unmasked entries (copied in by index, O(B)); decay is applied by index. Under
torch's Adam/AdamW the masked entries' second moment is set to 1 once after the first step
and reset to 0 when an entry is unmasked: their update stays exactly 0 (the first moment is
0), the unmasked entries' state is what it would be from zeros, and the inner ``sqrt`` runs
on normal numbers instead of zeros (its slow path). Memory: the kept gradient (one value per
maskable scalar), row maxima (1/``BLOCK`` of that) and O(B) indices and values.
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

CHUNK = 1 << 18  # scores computed at a time when β ≠ 0 (1 MiB of float32)
BLOCK = 64  # entries per row of the row-maximum filter


class ID3(torch.optim.Optimizer):
    """``optimizer`` with ID³ masks on ``params`` (name → parameter; the optimizer's other
    parameters, e.g. a new head, train in full).

    Args:
        budget: B, scalars unmasked in all (1..number of masked scalars).
        horizon: T, steps over which they are unmasked.
        eps: ε of the D³ score; exp: its β (0: gradient magnitude only).
        mask: ``"d3"`` (the method), or ``"random"``: the baseline of a static random mask
            of the same size — B entries drawn uniformly (torch's generator) at the first
            step, none after (``horizon`` is then unused).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: dict[str, nn.Parameter],
        budget: int,
        horizon: int,
        eps: float = 1e-3,
        exp: float = 0.0,
        mask: str = "d3",
    ) -> None:
        size = sum(p.numel() for p in params.values())
        if not 0 < budget <= size:
            raise budget_error(budget, size, "maskable weights")
        if horizon <= 0:
            raise SpliceError(f"horizon {horizon} must be ≥ 1 step")
        if mask not in ("d3", "random"):
            raise SpliceError(f"ID³ mask {mask!r} is not d3 or random")
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
        self.size = size
        self.random = mask == "random"
        self.index = {n: torch.zeros(0, dtype=torch.long) for n in params}  # unmasked, flat
        self.origin: dict[str, list[Tensor]] = {n: [] for n in params}  # their first values
        # the masked gradient handed to the inner step: 0 but at the unmasked entries
        self.grads = {n: torch.zeros_like(p) for n, p in params.items()}
        # Adam's second moment of masked entries is 1 (see the module docstring)
        self.ones_v = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)

    @property
    def masks(self) -> dict[str, Tensor]:
        """name → bool mask of the unmasked (trainable) entries."""
        out = {}
        for n, p in self.named.items():
            out[n] = torch.zeros(p.shape, dtype=torch.bool)
            out[n].view(-1)[self.index[n]] = True
        return out

    def increment(self, t: int) -> int:
        """Entries unmasked at step ``t`` (increment-S: Σ over t < T is exactly B)."""
        if self.random:
            return self.budget if t == 0 else 0
        if t >= self.horizon:
            return 0
        return self.budget // self.horizon + (1 if t < self.budget % self.horizon else 0)

    def unmasked(self) -> int:
        return sum(len(i) for i in self.index.values())

    def _d3(self, g: Tensor, name: str, where: slice | Tensor) -> Tensor:
        """D³ scores of gradient entries ``g`` (flat, at ``where`` in parameter ``name``)."""
        s = g.float().abs()
        if self.exp:
            flat = self.named[name].detach().view(-1)
            theta = flat.index_select(0, where) if isinstance(where, Tensor) else flat[where]
            s.div_(theta.float().abs().add_(self.eps).pow_(self.exp))
        return s

    def _rows(self, name: str, g: Tensor) -> Tensor:
        """The highest score of each BLOCK entries of ``g`` (the last row may be shorter)."""
        m = len(g) // BLOCK * BLOCK
        if not self.exp:
            rows = g[:m].view(-1, BLOCK)
            parts = [torch.maximum(rows.amax(1), rows.amin(1).neg_())]
        else:
            parts = [self._d3(g[lo : min(lo + CHUNK, m)], name, slice(lo, min(lo + CHUNK, m)))
                     .view(-1, BLOCK).amax(1) for lo in range(0, m, CHUNK)]  # fmt: skip
        if m < len(g):
            parts.append(self._d3(g[m:], name, slice(m, None)).amax().view(1))
        return torch.cat(parts)

    def _candidates(self, grads: dict[str, Tensor], count: int):
        """(name, flat indices) per tensor and their scores, holding the ``count`` highest of
        the masked entries: those scoring ≥ the ``count``-th highest row maximum (at least
        ``count`` rows reach it, so at least ``count`` entries do), or, where that is 0 or
        there are fewer rows than ``count``, every masked entry."""
        rows = {n: self._rows(n, g) for n, g in grads.items()}
        every = torch.cat(list(rows.values())) if rows else torch.zeros(0)
        thr = float(torch.topk(every, count).values[-1]) if len(every) >= count else 0.0
        where, values = [], []
        for name, p in self.named.items():
            g = grads.get(name)
            if thr <= 0:  # unmasked entries score 0 here: rank every entry, leaving them out
                s = torch.zeros(p.numel()) if g is None else self._d3(g, name, slice(None))
                s.index_fill_(0, self.index[name], float("-inf"))
                where.append((name, torch.arange(p.numel())))
                values.append(s)
                continue
            if g is None:
                continue
            hot = torch.nonzero(rows[name] >= thr).view(-1)
            at = (hot[:, None] * BLOCK + torch.arange(BLOCK)).view(-1)
            at = at[at < len(g)]  # the last row may be shorter
            s = self._d3(g.index_select(0, at), name, at)
            hit = torch.nonzero(s >= thr).view(-1)
            where.append((name, at[hit]))
            values.append(s[hit])
        return where, torch.cat(values)

    @torch.no_grad()
    def _unmask(self, count: int) -> dict[str, Tensor]:
        """Unmask the ``count`` highest D³ scores among the masked entries (exact); returns
        the new indices per tensor. Reads the unmasked entries' gradients first and sets them
        to 0 in ``p.grad`` (they score 0), so the masked gradient must be built after."""
        if self.random:  # global positions; each tensor is one run of them
            best = torch.randperm(self.size)[:count]
            where = [(n, torch.arange(p.numel())) for n, p in self.named.items()]
        else:
            grads = {}
            for name, p in self.named.items():
                if p.grad is not None:
                    grads[name] = p.grad.view(-1)
                    grads[name].index_fill_(0, self.index[name], 0)
            where, values = self._candidates(grads, count)
            best = torch.topk(values, count, sorted=False).indices
        start, picks = 0, {}
        for name, idx in where:
            sel = best[(best >= start) & (best < start + len(idx))] - start
            picks.setdefault(name, []).append(idx[sel])
            start += len(idx)
        out = {}
        for name, parts in picks.items():
            pick = out[name] = torch.cat(parts)
            self.origin[name].append(self.named[name].detach().view(-1).index_select(0, pick))
            state = self.inner.state.get(self.named[name], {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if isinstance(state.get(key), Tensor):
                    state[key].view(-1).index_fill_(0, pick, 0)
        return out

    @torch.no_grad()
    def _mask_grads(self, count: int) -> None:
        """Unmask ``count`` entries, then hand the inner step gradients that are 0 at every
        masked entry: the unmasked entries copied into :attr:`grads` (O(B)), or, when the
        caller accumulated into that tensor itself, it zeroed but there (one pass)."""
        kept = {n: p.grad.view(-1).index_select(0, self.index[n]) for n, p in self.named.items()
                if p.grad is not None}  # fmt: skip
        new = self._unmask(count) if count else {}
        for name, p in self.named.items():
            old, pick = self.index[name], new.get(name)
            idx = self.index[name] = old if pick is None else torch.cat([old, pick])
            if p.grad is None:
                continue
            values = (
                kept[name]
                if pick is None
                else torch.cat([kept[name], p.grad.view(-1).index_select(0, pick)])
            )
            z = self.grads[name]
            if p.grad is z:
                z.zero_()
            z.view(-1).index_copy_(0, idx, values)
            p.grad = z

    @torch.no_grad()
    def _ones_v(self) -> None:
        """After the first inner step: masked entries' second moments (0 so far) become 1."""
        for name, p in self.named.items():
            state = self.inner.state.get(p, {})
            for key in ("exp_avg_sq", "max_exp_avg_sq"):
                if isinstance(state.get(key), Tensor):
                    v = state[key].view(-1)
                    kept = v.index_select(0, self.index[name])
                    v.fill_(1.0).index_copy_(0, self.index[name], kept)

    @torch.no_grad()
    def _decay(self) -> list[float]:
        """Weight decay on unmasked entries only (by index: masked entries gain exactly 0);
        returns the groups' rates and sets them to 0 for the inner step."""
        decoupled = isinstance(self.inner, torch.optim.AdamW)
        index = {id(p): self.index[n] for n, p in self.named.items()}
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
                idx = index.get(id(p))
                if idx is not None:
                    flat = p.view(-1)
                    if decoupled_here:
                        flat.index_copy_(
                            0, idx, flat.index_select(0, idx).mul_(1 - rate)
                        )  # as AdamW
                    else:
                        p.grad.view(-1).index_add_(0, idx, flat.index_select(0, idx), alpha=rate)
                elif decoupled_here:
                    p.mul_(1 - rate)
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
        self._mask_grads(self.increment(self.t))
        rates = self._decay()
        try:
            self.inner.step()
        finally:
            for group, wd in zip(self.param_groups, rates, strict=True):
                group["weight_decay"] = wd
        if self.t == 0 and self.ones_v:
            self._ones_v()
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
            idx, orig = self.index[name], torch.cat(self.origin[name])
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
