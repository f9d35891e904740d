"""Differentiable merging over a base module (merging.md §16 items 11–12).

:class:`TaskVectors` holds the base tensors and the task vectors stacked per name, once, on
the compute device. :meth:`TaskVectors.merge` builds ``θ₀ + Σ_t c_t τ_t`` for a task-wise or
per-block coefficient layout, and :class:`Network` runs the *unmodified* base module with the
merged tensors through ``torch.func.functional_call``: per step only the merged tensors are
new, the module and the task vectors are never copied or written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from splice.errors import SpliceError

__all__ = [
    "Forward",
    "Head",
    "Network",
    "TaskVectors",
    "accumulate_grad",
    "batch_statistics",
    "entropy",
    "frozen",
    "resolve_device",
]

Forward = Callable[[nn.Module, Any], Tensor]
"""``forward(module, batch) -> features or logits``; default ``module(batch)`` (``**batch``
for a mapping)."""
Head = Callable[[Tensor], Tensor] | Mapping[str, Tensor]
"""A task's classifier: a callable on the forward's output (the bench's linear heads), or a
mapping of task-specific tensors swapped into the module for that task (e.g. the
``classifier.*`` tensors of an HF sequence-classification fine-tune). Heads stay frozen."""


def resolve_device(module: nn.Module, device: str | torch.device | None) -> torch.device:
    """The module's device, or ``device`` if the module is already there.

    Raises:
        SpliceError: the module lives elsewhere (learned merges never move a caller's module).
    """
    here = next(iter(module.parameters()), torch.empty(0)).device
    if device is None:
        return here
    want = torch.device(device)
    if want.type != here.type or (want.index is not None and want.index != here.index):
        raise SpliceError(
            f"the base module is on {here}, not on {want}",
            fix=f"move it first: module.to({str(want)!r})",
        )
    return here


def _materialize(delta: Any, like: Tensor) -> Tensor:
    value = delta.materialize() if hasattr(delta, "materialize") else delta
    if not isinstance(value, Tensor):
        raise SpliceError(f"a delta is a {type(value).__name__}, not a Tensor or splice Delta")
    return value.detach().to(device=like.device, dtype=like.dtype)


@dataclass
class TaskVectors:
    """Base tensors and task vectors of the names some task changes, in module order.

    ``stacked[name]`` is ``(T, *shape)``: row t is task t's ΔW (zeros where it has none).
    """

    tasks: tuple[str, ...]
    names: tuple[str, ...]
    base: dict[str, Tensor]
    stacked: dict[str, Tensor]

    @classmethod
    def build(
        cls,
        module: nn.Module,
        deltas: Mapping[str, Mapping[str, Any]],
        device: str | torch.device | None = None,
    ) -> TaskVectors:
        """Stack ``deltas`` ({task: {tensor name: Tensor or Delta}}) against ``module``.

        Raises:
            SpliceError: no tasks, a name the module lacks, a shape mismatch, a non-float
                target, or the module on another device.
        """
        resolve_device(module, device)
        if not deltas:
            raise SpliceError("no task deltas given", fix="pass {task: {tensor name: ΔW}}")
        own = dict(module.named_parameters(remove_duplicate=False))
        own.update(module.named_buffers(remove_duplicate=False))
        wanted = {n for d in deltas.values() for n in d}
        for n in sorted(wanted):
            if n not in own:
                raise SpliceError(
                    "delta target is not a tensor of the base module",
                    where=n,
                    fix="key deltas by the base module's state-dict names",
                )
            if not own[n].is_floating_point():
                raise SpliceError("delta target is not floating point", where=n)
        names = tuple(n for n in own if n in wanted)
        tasks = tuple(deltas)
        base = {n: own[n].detach() for n in names}
        stacked: dict[str, Tensor] = {}
        for n in names:
            rows = []
            for t in tasks:
                d = deltas[t].get(n)
                rows.append(torch.zeros_like(base[n]) if d is None else _materialize(d, base[n]))
                if rows[-1].shape != base[n].shape:
                    raise SpliceError(
                        f"task {t!r}: delta shape {tuple(rows[-1].shape)} differs from the "
                        f"base's {tuple(base[n].shape)}",
                        where=n,
                    )
            stacked[n] = torch.stack(rows)
        return cls(tasks, names, base, stacked)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_blocks(self) -> int:
        return len(self.names)

    @property
    def coef_dtype(self) -> torch.dtype:
        """Coefficients' dtype: float32, or float64 for a float64 model."""
        return torch.promote_types(self.base[self.names[0]].dtype, torch.float32)

    def with_stacked(self, stacked: Mapping[str, Tensor]) -> TaskVectors:
        """The same base with other task vectors (e.g. TIES-processed, masked)."""
        return TaskVectors(self.tasks, self.names, self.base, dict(stacked))

    def combine(self, name: str, coef: Tensor, mask: Tensor | None = None) -> Tensor:
        """``Σ_t coef_t τ_t[name]`` (``coef`` is ``(T,)`` or ``(T, *shape)``), times ``mask``."""
        tv = self.stacked[name]
        if coef.dim() == 1:
            out = torch.tensordot(coef.to(tv.dtype), tv, dims=1)
        else:
            out = (coef.to(tv.dtype) * tv).sum(0)
        return out if mask is None else out * mask

    def merge(self, coef: Tensor, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``θ₀ + Σ_t c_t τ_t`` per name: ``coef`` is ``(T,)`` (task-wise) or ``(B, T)``, one
        row per name in :attr:`names` (layer-wise); ``masks`` multiply each name's sum."""
        rows = coef.expand(self.num_blocks, -1) if coef.dim() == 1 else coef
        return {
            n: self.base[n] + self.combine(n, rows[b], None if masks is None else masks[n])
            for b, n in enumerate(self.names)
        }

    def sum_norm(self) -> float:
        """``‖Σ_t τ_t‖₂`` over all names (used in reports)."""
        return float(sum(self.stacked[n].sum(0).double().pow(2).sum() for n in self.names)) ** 0.5


def to_cpu(weights: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies of merged tensors in the dtype of ``like`` (the base tensors)."""
    return {n: w.detach().to("cpu", like[n].dtype).clone() for n, w in weights.items()}


def _default_forward(module: nn.Module, batch: Any) -> Tensor:
    return module(**batch) if isinstance(batch, Mapping) else module(batch)


class _Bound(nn.Module):
    """``forward(module, batch)`` as a module, so ``functional_call`` can swap its tensors."""

    def __init__(self, module: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.module = module
        self.fn = forward

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.module, batch)


class Network:
    """Task logits of the base module run with replacement tensors.

    ``logits(weights, task, batch) = heads[task](forward(module, batch))`` with ``weights``
    swapped in for the module's tensors of the same names during the call; a mapping head is
    swapped in too (``heads=None``: the forward's output are the logits of every task).
    """

    def __init__(
        self,
        module: nn.Module,
        forward: Forward | None = None,
        heads: Mapping[str, Head] | None = None,
        tasks: Iterable[str] = (),
    ) -> None:
        missing = [t for t in tasks if heads is not None and t not in heads]
        if missing:
            raise SpliceError(
                f"no head for task(s) {missing}", fix="pass heads={task: callable} for every task"
            )
        self.module = module
        self.bound = _Bound(module, forward or _default_forward)
        self.heads = heads

    def frozen(self) -> Any:
        """Context: the module's and the heads' own parameters take no gradient."""
        return frozen(self.module, *(self.heads or {}).values())

    def features(self, weights: Mapping[str, Tensor], batch: Any) -> Tensor:
        swapped = {f"module.{n}": w for n, w in weights.items()}
        return functional_call(self.bound, swapped, (batch,))

    def logits(self, weights: Mapping[str, Tensor], task: str, batch: Any) -> Tensor:
        head = None if self.heads is None else self.heads[task]
        if isinstance(head, Mapping):
            return self.features({**weights, **head}, batch)
        out = self.features(weights, batch)
        return out if head is None else head(out)


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Context: every batch norm of ``module`` normalises with the current batch's mean and
    variance (train-mode normalisation) and leaves its running buffers untouched; modes and
    flags are restored after."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.train()
        m.track_running_stats = False  # no running buffers read or updated
    try:
        yield
    finally:
        for m, training, track in saved:
            m.train(training)
            m.track_running_stats = track


@contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """No gradient to the parameters of ``modules`` (non-modules are ignored) inside; the
    flags are restored after, so learned merges never accumulate ``.grad`` in them."""
    flags = [
        (p, p.requires_grad) for m in modules if isinstance(m, nn.Module) for p in m.parameters()
    ]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def accumulate_grad(
    weights: Mapping[str, Tensor], losses: Iterable[Callable[[Mapping[str, Tensor]], Tensor]]
) -> float:
    """Backpropagate ``Σ loss(weights)`` into whatever ``weights`` depend on; returns the sum.

    Each loss is backpropagated alone through detached copies of ``weights`` (so only one
    batch's activations live at a time), then the summed gradients go through the merge once.
    """
    leaves = {n: w.detach().requires_grad_() for n, w in weights.items()}
    total = 0.0
    for loss_fn in losses:
        loss = loss_fn(leaves)
        loss.backward()
        total += float(loss.detach())
    pairs = [(weights[n], g.grad) for n, g in leaves.items() if g.grad is not None]
    pairs = [(w, g) for w, g in pairs if w.requires_grad]
    if pairs:
        torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])
    return total


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the batch (AdaMerging's loss, §14.3)."""
    logp = logits.log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return -(logp.exp() * logp).sum(-1).mean()
