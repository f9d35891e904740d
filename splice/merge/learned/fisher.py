"""Fisher merging: a per-entry average of the experts weighted by their diagonal Fisher
information (Matena & Raffel, NeurIPS 2022; FusionBench ``FisherMergingAlgorithm``).

``θ* = Σ_t (F_t + ε)·θ_t / Σ_t (F_t + ε)`` per entry, with ``F_t`` the diagonal Fisher of expert t
on task t's examples and ``ε = floor`` (FusionBench's minimal Fisher weight, 1e-6) so entries
no task is sensitive to fall back to the plain average. Written on task vectors the base
cancels: ``τ* = Σ_t (F_t + ε)τ_t / Σ_t (F_t + ε)``; equal Fishers give the plain average.

``F_t = mean over examples of (∂ log p(y|x) / ∂θ)²`` from per-example gradients of the expert's
log-likelihood of ``y``: sampled from the model's own predictive distribution (``target =
"sampled"``, the true Fisher as in the paper), its argmax (``"predicted"``) or the given labels
(``"labels"``, the empirical Fisher; a label < 0 marks a position left out, e.g. a causal
LM's prompt tokens, as cross-entropy's ``ignore_index``). The per-example gradients make the
pass one forward and one backward per example. With ``stats`` (a directory) each task's
Fisher is read from ``<stats>/<task>.fisher.safetensors`` when it exists (refused in one line
if it was made on another base, for other deltas or another tensor set) and written there
otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, Samples, progress_bar
from splice.merge.learned._functional import (
    Forward,
    Head,
    Network,
    TaskVectors,
    resolve_device,
    to_cpu,
)
from splice.merge.learned._stats import fingerprint, task_statistics

__all__ = ["Params", "diagonal_fisher", "fisher", "fisher_average"]

Target = Literal["sampled", "predicted", "labels"]
Stats = tuple[dict[str, Tensor], dict[str, int], int]


class Params(HyperParams):
    num_samples: int = Field(64, ge=1, description="examples per task (one backward each)")
    target: Target = Field("sampled", description="y of log p(y|x): sampled, predicted, labels")
    floor: float = Field(1e-6, ge=0, description="added to every Fisher entry")
    stats: str | None = Field(None, description="directory of per-task Fisher files")


def diagonal_fisher(
    net: Network,
    task: str,
    weights: Mapping[str, Tensor],
    samples: Samples,
    count: int,
    target: Target,
    device: torch.device,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Mean squared per-example gradient of ``log p(y|x)`` over the first ``count`` examples."""
    leaves = {n: w.detach().clone().requires_grad_() for n, w in weights.items()}
    out = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for j in range(count):
        batch, labels = samples.take(np.array([j]), device)
        logits = net.logits(leaves, task, batch)
        logp = logits.reshape(-1, logits.shape[-1]).log_softmax(-1, dtype=torch.float64)
        if target == "labels":
            assert labels is not None
            y = labels.reshape(-1).to(logp.device)
            logp, y = logp[y >= 0], y[y >= 0]  # label < 0: an ignored position (a prompt's)
        elif target == "predicted":
            y = logp.argmax(-1)
        else:
            y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator)
            y = y.reshape(-1).to(logp.device)
        picked = logp.gather(1, y[:, None]).sum()
        grads = torch.autograd.grad(picked, list(leaves.values()), allow_unused=True)
        for n, g in zip(leaves, grads, strict=True):
            if g is not None:
                out[n] += g.double().pow(2)
    return {n: f / count for n, f in out.items()}


def fisher_average(
    tv: TaskVectors, fishers: list[Mapping[str, Tensor]], floor: float
) -> dict[str, Tensor]:
    """``Σ_t (F_t + floor)τ_t / Σ_t (F_t + floor)`` per name (float64)."""
    merged = {}
    for n in tv.names:
        weight = torch.stack([f[n].to(tv.stacked[n].device) for f in fishers]) + floor
        total = weight.sum(0)
        num = (weight * tv.stacked[n].double()).sum(0)
        merged[n] = torch.where(
            total > 0, num / total.clamp_min(1e-300), tv.stacked[n].double().mean(0)
        )
    return merged


def fisher(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any] | None,
    *,
    heads: Mapping[str, Head] | None = None,
    forward: Forward | None = None,
    num_samples: int = 64,
    target: Target = "sampled",
    floor: float = 1e-6,
    stats: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Merge by Fisher-weighted averaging; ``data`` is {task: inputs} (``(inputs, labels)``
    for ``target="labels"``), ``heads[task]`` turns the forward's output into task logits.

    Raises:
        SpliceError: a task with neither data nor a statistics file, ``target="labels"``
            without labels, or a statistics file from another base/deltas/tensor set.
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward, heads, tv.tasks)
    base_id = fingerprint(module.state_dict())
    gen = torch.Generator().manual_seed(seed)
    fishers: list[Mapping[str, Tensor]] = []
    loaded: list[str] = []
    stat_seconds = 0.0
    with net.frozen(), progress_bar("Fisher statistics", len(tv.tasks), progress, None) as up:
        for i, task in enumerate(tv.tasks):
            expert = {n: tv.base[n] + tv.stacked[n][i] for n in tv.names}
            ids = (base_id, fingerprint({n: tv.stacked[n][i] for n in tv.names}))

            def compute(s: Samples, task: str = task, expert: dict = expert) -> Stats:
                if target == "labels" and s.labels is None:
                    raise SpliceError(f"Fisher target 'labels': task {task!r} has no labels")
                count = min(num_samples, len(s))
                f = diagonal_fisher(net, task, expert, s, count, target, dev, gen)
                return f, dict.fromkeys(f, count), count

            t0 = time.perf_counter()
            values, _, was_loaded = task_statistics(
                "fisher", "Fisher merging", stats, task, ids, tv.names, data, compute
            )
            fishers.append(values)
            if was_loaded:
                loaded.append(task)
            stat_seconds += time.perf_counter() - t0
            up(i + 1, 0.0)
    with torch.no_grad():
        merged = fisher_average(tv, fishers, floor)
        weights = {n: tv.base[n] + merged[n].to(tv.base[n].dtype) for n in tv.names}
    info = {
        "tasks": list(tv.tasks),
        "num_samples": num_samples,
        "target": target,
        "stats_seconds": stat_seconds,
        "stats_loaded": loaded,
        "seconds": time.perf_counter() - start,
    }
    return LearnedMerge(to_cpu(weights, tv.base), None, [], info)


learned.register("fisher")(
    LearnedMethod(
        name="fisher",
        pretty_name="Fisher merging",
        reference="https://arxiv.org/abs/2111.09832 (fusionbench.md §2)",
        fn=fisher,
        Params=Params,
        data="unlabeled",
        needs_labels=lambda p: getattr(p, "target", "") == "labels",
    )
)
