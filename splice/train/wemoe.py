"""Train WEMoE routers through the one training loop (:func:`splice.train.loop.minimise`).

The objective is the paper's test-time adaptation, the mean prediction entropy of each task's
head on unlabeled inputs of that task (``objective="entropy"``), or cross-entropy on labeled
validation data (``"ce"``). Each step takes one fresh batch per task (seeded, reshuffled every
pass) and one Adam step on the routers of :func:`splice.merge.fusion.wemoe.routers`; the rest
of the model stays frozen. Pass test inputs only for the transductive protocol, and say so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.merge.fusion.wemoe import routers
from splice.train.loop import minimise

__all__ = ["train_routers"]


def train_routers(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    heads: Mapping[str, Callable[[Tensor], Tensor]],
    *,
    labels: Mapping[str, Tensor] | None = None,
    objective: Literal["entropy", "ce"] = "entropy",
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """Fit the routers of ``model``; returns the loss per step (summed over tasks).

    Raises:
        SpliceError: no routers, a task without a head, or ``objective="ce"`` without labels.
    """
    params = routers(model)
    if not params:
        raise SpliceError("no WEMoE routers in this model", fix="build it with wemoe.upcycle")
    tasks = list(inputs)
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise SpliceError(f"no head for task(s) {missing}")
    if objective == "ce" and (labels is None or any(t not in labels for t in tasks)):
        raise SpliceError("objective 'ce' needs labels for every task")
    run = forward or (lambda m, x: m(x))
    rng = np.random.default_rng(seed)
    order = {t: np.empty(0, dtype=np.int64) for t in tasks}

    def take(task: str) -> np.ndarray:
        n = inputs[task].shape[0]
        if len(order[task]) < min(batch_size, n):
            order[task] = np.concatenate([order[task], rng.permutation(n)])
        idx, order[task] = order[task][:batch_size], order[task][batch_size:]
        return idx

    def loss(step: int) -> tuple[Tensor, int]:
        total: Tensor = torch.zeros(())
        seen = 0
        for task in tasks:
            idx = torch.from_numpy(take(task))
            logits = heads[task](run(model, inputs[task][idx]))
            if objective == "ce":
                assert labels is not None
                total = total + nn.functional.cross_entropy(logits, labels[task][idx])
            else:
                logp = logits.log_softmax(-1)
                total = total + -(logp.exp() * logp).sum(-1).mean()
            seen += len(idx)
        return total, seen

    mine = {id(p) for p in params}
    others = [m for m in (model, *heads.values()) if isinstance(m, nn.Module)]
    flags = [(p, p.requires_grad) for m in others for p in m.parameters() if id(p) not in mine]
    was = model.training
    model.eval()
    try:
        for p, _ in flags:  # only the routers take gradients
            p.requires_grad_(False)
        return minimise(loss, torch.optim.Adam(params, lr=lr), steps)
    finally:
        model.train(was)
        for p, flag in flags:
            p.requires_grad_(flag)
