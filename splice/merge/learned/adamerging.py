"""AdaMerging: merge coefficients learned by entropy minimisation (Yang et al., ICLR 2024).

merging.md §14: ``θ^(b) = θ₀^(b) + Σ_t clamp(Λ_{b,t}, 0, 1)·τ_t^(b)`` with one coefficient per
task (``mode="task"``) or per task and block (``"layer"``; a block is one named tensor), Λ
initialised to 0.3. Each step sums the mean prediction entropy of ``batches_per_step`` fresh
unlabeled batches per task and takes one Adam step on Λ. ``ties_density`` gives AdaMerging++:
the task vectors are TIES-processed first (global per-task trim, elected sign, disagreeing
entries dropped) but stay separate. The paper adapts on unlabeled *test* inputs
(transductive); pass training or validation inputs to keep test data unseen.

``bn="batch"`` fits the coefficients with every batch norm normalising by the batch's own
statistics (FusionBench's AdaMerging for ResNets adapts in ``train()`` mode); the running
buffers are neither used nor changed, so the merged model's statistics are to be set after
(e.g. :func:`splice.compress.match_bn`). With ``"running"`` (default) the stored statistics
are used, which a merge of fine-tunes with their own statistics no longer matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, Stream, progress_bar, streams
from splice.merge.learned._functional import (
    Forward,
    Head,
    Network,
    TaskVectors,
    accumulate_grad,
    batch_statistics,
    entropy,
    resolve_device,
    to_cpu,
)
from splice.merge.methods._sparsify import elect_sign, magnitude_threshold, trim_

__all__ = ["Params", "adamerging", "entropy_objective", "learn_coefficients", "ties_process"]


class Params(HyperParams):
    mode: Literal["layer", "task"] = Field("layer", description="coefficients per block or task")
    init: float = Field(0.3, description="initial coefficient λ")
    lr: float = Field(1e-3, description="Adam learning rate")
    steps: int = Field(500, ge=0, description="optimisation steps")
    batch_size: int = Field(16, ge=1, description="examples per batch")
    batches_per_step: int = Field(2, ge=1, description="batches per task per step")
    clamp: bool = Field(True, description="clamp coefficients to [0, 1] inside the merge")
    bn: Literal["running", "batch"] = Field(
        "running", description="batch norms use their running statistics or the batch's"
    )
    ties_density: float | None = Field(
        None, gt=0, le=1, description="AdaMerging++: TIES-process task vectors, keeping this"
    )


def ties_process(tv: TaskVectors, density: float) -> TaskVectors:
    """AdaMerging++ preprocessing (§14.3): TIES trim and sign election, without aggregation.

    Per task, keep the ``density`` largest ``|τ_t|`` over the whole model; elect the sign of
    ``Σ_t τ̂_t`` per entry (where it is 0, the model-wide majority sign); zero the entries
    whose sign disagrees. Returns new task vectors; ``tv`` is not changed.
    """
    t = tv.num_tasks
    flat = torch.cat([tv.stacked[n].reshape(t, -1) for n in tv.names], dim=1)  # (T, P), a copy
    for row in flat:
        trim_(row, magnitude_threshold(row, density))
    sign = elect_sign(list(flat), zero_sign=0.0).to(flat.dtype)
    sign[sign == 0] = torch.sign(sign.sum())
    flat.mul_(flat.sign() == sign)
    sizes = [tv.stacked[n][0].numel() for n in tv.names]
    parts = flat.split(sizes, dim=1)
    return tv.with_stacked(
        {n: p.reshape(tv.stacked[n].shape) for n, p in zip(tv.names, parts, strict=True)}
    )


def _task_entropy(net: Network, task: str, batch: Any, weights: Mapping[str, Tensor]) -> Tensor:
    return entropy(net.logits(weights, task, batch))


def entropy_objective(
    weights: Mapping[str, Tensor],
    net: Network,
    feeds: Mapping[str, Stream],
    batches_per_step: int,
    device: torch.device,
) -> float:
    """Backpropagate ``Σ_t Σ_batches H(softmax(logits))`` into ``weights``' leaves; return it."""
    losses: list[Callable[[Mapping[str, Tensor]], Tensor]] = []
    for task, feed in feeds.items():
        for _ in range(batches_per_step):
            batch, _, _ = feed.next(device)
            losses.append(partial(_task_entropy, net, task, batch))
    return accumulate_grad(weights, losses)


def learn_coefficients(
    tv: TaskVectors,
    net: Network,
    feeds: Mapping[str, Stream],
    mode: Literal["layer", "task"],
    init: float,
    lr: float,
    steps: int,
    clamp: bool,
    batches_per_step: int,
    device: torch.device,
    progress: Progress,
    masks: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, list[float]]:
    """The AdaMerging loop over ready task vectors: returns the effective coefficients
    (clamped if ``clamp``) and the objective per step. ``masks`` multiply each block's sum."""
    dtype = tv.coef_dtype
    shape = (tv.num_blocks, tv.num_tasks) if mode == "layer" else (tv.num_tasks,)
    coef = torch.full(shape, float(init), device=device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([coef], lr=lr)

    def effective() -> Tensor:
        return coef.clamp(0, 1) if clamp else coef

    history: list[float] = []
    with net.frozen(), progress_bar(f"AdaMerging ({mode}-wise)", steps, progress) as update:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            weights = tv.merge(effective(), masks)
            history.append(entropy_objective(weights, net, feeds, batches_per_step, device))
            opt.step()
            update(step + 1, history[-1])
    return effective().detach(), history


def adamerging(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    *,
    heads: Mapping[str, Head] | None = None,
    forward: Forward | None = None,
    mode: Literal["layer", "task"] = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 500,
    batch_size: int = 16,
    batches_per_step: int = 2,
    clamp: bool = True,
    bn: Literal["running", "batch"] = "running",
    ties_density: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Learn AdaMerging coefficients on unlabeled ``data`` ({task: inputs}); merge with them.

    ``deltas`` are {task: {tensor name: ΔW}} (tensors or splice Deltas) keyed like ``module``'s
    state dict; ``heads[task]`` maps ``forward(module, batch)`` to the task's logits.
    Returns the merged tensors and the effective (clamped) coefficients: ``(T,)`` task-wise or
    ``(B, T)`` layer-wise, rows in ``info["names"]`` order.
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    if ties_density is not None:
        tv = ties_process(tv, ties_density)
    net = Network(module, forward, heads, tv.tasks)
    feeds = streams(data, tv.tasks, batch_size, seed)
    with batch_statistics(module) if bn == "batch" else nullcontext():
        final, history = learn_coefficients(
            tv, net, feeds, mode, init, lr, steps, clamp, batches_per_step, dev, progress
        )
    with torch.no_grad():
        weights = to_cpu(tv.merge(final), tv.base)
    info = {
        "mode": mode,
        "bn": bn,
        "tasks": list(tv.tasks),
        "names": list(tv.names),
        "num_coefficients": final.numel(),
        "seconds": time.perf_counter() - start,
    }
    return LearnedMerge(weights, final.cpu(), history, info)


learned.register("adamerging")(
    LearnedMethod(
        name="adamerging",
        pretty_name="AdaMerging",
        reference="https://arxiv.org/abs/2310.02575 (merging.md §14)",
        fn=adamerging,
        Params=Params,
        data="unlabeled",
        short={"steps": 100, "lr": 5e-3, "batches_per_step": 1},
    )
)
