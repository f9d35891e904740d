"""RegMean: merge every linear layer by closed-form regression on input Grams (Jin et al., ICLR
2023; FusionBench ``RegMeanAlgorithm``).

For a linear layer with expert weights ``W_t`` and input Gram ``G_t = X_tᵀX_t`` (recorded while
expert t runs on task t's examples), the merged weight minimises ``Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²``:
``W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹`` where ``G̃_t = α·G_t + (1 − α)·diag(G_t)`` shrinks the
off-diagonal entries (``alpha``, RegMean's "reduce non-diagonal ratio", 0.9 by default; 1 is
the plain least-squares solution). Written on task vectors, ``W* = W₀ + (Σ τ_t G̃_t)(Σ G̃_t)⁺``:
the base cancels where ``Σ G̃_t`` is invertible and stays put in its null space.

splice solves the bias jointly with the weight (inputs augmented with a column of ones, as
LOT does), the q/k/v blocks and ``out_proj`` of ``nn.MultiheadAttention`` as linear layers of
their own inputs, and averages every other tensor (norms, embeddings), as RegMean does;
``info["averaged"]`` lists them. RegMean++ (the sequential variant that records each layer's
inputs in the partially merged model) is not implemented: the specs name it without a source.

The Grams come from one streaming pass over ``num_samples`` examples per task through the
probing-style forward pre-hooks of :mod:`splice.merge.learned._lot_layers`. With ``stats`` (a
directory), each task's Grams are read from ``<stats>/<task>.gram.safetensors`` when it exists
— refused in one line if it was made on another base, for other deltas or another tensor set
(:mod:`splice.merge.learned._stats`) — and written there otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, Samples, progress_bar
from splice.merge.learned._functional import Forward, Network, TaskVectors, resolve_device, to_cpu
from splice.merge.learned._lot_layers import Layer, feed, find_layers
from splice.merge.learned._stats import fingerprint, task_statistics
from splice.merge.learned.lot import _assemble, _close_task

__all__ = ["Params", "regmean", "shrink"]

Stats = tuple[dict[str, Tensor], dict[str, int], int]


class Params(HyperParams):
    alpha: float = Field(0.9, ge=0, le=1, description="off-diagonal Gram scale (1: plain LS)")
    num_samples: int = Field(256, ge=1, description="unlabeled examples per task")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")
    rtol: float = Field(1e-10, ge=0, description="pseudo-inverse cut-off relative to ‖G‖")
    stats: str | None = Field(None, description="directory of per-task Gram files (read/write)")


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """``α·G + (1 − α)·diag(G)``."""
    if alpha == 1.0:
        return gram
    return alpha * gram + (1 - alpha) * torch.diag_embed(gram.diagonal())


def _linear_layers(module: nn.Module, names: set[str]) -> dict[str, Layer]:
    return {k: lay for k, lay in find_layers(module, names).items() if lay.kind == "linear"}


def _collect(
    module: nn.Module,
    net: Network,
    layers: Mapping[str, Layer],
    expert: Mapping[str, Tensor],
    samples: Any,
    count: int,
    batch_size: int,
    device: torch.device,
    rows: Callable[[Any], Tensor] | None,
) -> dict[str, tuple[Tensor, int]]:
    """One pass of the expert over ``count`` examples: ``{layer key: (G_t, rows)}``."""
    run = partial(net.features, dict(expert))
    feed(module, layers, run, samples, count, batch_size, device, rows)
    out = {}
    for key, lay in layers.items():
        if lay.task_stat is not None:
            out[key] = (lay.task_stat, lay.task_rows)
        lay.task_stat, lay.task_rows = None, 0
    return out


def regmean(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any] | None,
    *,
    forward: Forward | None = None,
    rows: Callable[[Any], Tensor] | None = None,
    alpha: float = 0.9,
    num_samples: int = 256,
    batch_size: int = 32,
    rtol: float = 1e-10,
    stats: str | None = None,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Merge by RegMean from ``data`` ({task: unlabeled inputs}) or stored Grams (``stats``).

    Returns the merged tensors; ``info`` has the tensors solved per rule, the averaged ones,
    the seconds spent collecting statistics (``stats_seconds``) and which tasks' Grams were
    read from files (``stats_loaded``).

    Raises:
        SpliceError: a task with neither data nor a statistics file, or a statistics file
            from another base, other deltas or another tensor set.
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward)
    layers = _linear_layers(module, set(tv.names))
    base_id = fingerprint(module.state_dict())
    loaded: list[str] = []
    stat_seconds = 0.0
    with torch.no_grad(), progress_bar("RegMean statistics", len(tv.tasks), progress, None) as up:
        for i, task in enumerate(tv.tasks):
            ids = (base_id, fingerprint({n: tv.stacked[n][i] for n in tv.names}))
            expert = {n: tv.base[n] + tv.stacked[n][i] for n in tv.names}

            def compute(s: Samples, expert: dict[str, Tensor] = expert) -> Stats:
                count = min(num_samples, len(s))
                grams = _collect(module, net, layers, expert, s, count, batch_size, dev, rows)
                return (
                    {k: g for k, (g, _) in grams.items()},
                    {k: r for k, (_, r) in grams.items()},
                    count,
                )

            t0 = time.perf_counter()
            grams, counts, was_loaded = task_statistics(
                "gram", "RegMean", stats, task, ids, layers, data, compute
            )
            if was_loaded:
                loaded.append(task)
            stat_seconds += time.perf_counter() - t0
            for key, lay in layers.items():
                if key in grams:
                    lay.task_stat = shrink(grams[key].to(dev), alpha)
                    lay.task_rows = counts.get(key, 0)
                _close_task(lay, tv, i)
            up(i + 1, 0.0)
        merged, solved, averaged = _assemble(tv, layers, 0.0, rtol)
        weights = {n: tv.base[n] + merged[n].to(tv.base[n].dtype) for n in tv.names}
    info = {
        "tasks": list(tv.tasks),
        "solved": solved,
        "averaged": averaged,
        "num_samples": num_samples,
        "stats_seconds": stat_seconds,
        "stats_loaded": loaded,
        "seconds": time.perf_counter() - start,
    }
    return LearnedMerge(to_cpu(weights, tv.base), None, [], info)


learned.register("regmean")(
    LearnedMethod(
        name="regmean",
        pretty_name="RegMean",
        reference="https://arxiv.org/abs/2212.09849 (fusionbench.md §2)",
        fn=regmean,
        Params=Params,
        data="unlabeled",
    )
)
