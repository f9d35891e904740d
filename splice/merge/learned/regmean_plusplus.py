"""RegMean++: RegMean with the inputs of each layer taken from the *merged* model (Nguyen et
al., 2025, arXiv 2508.03121; FusionBench ``RegMeanAlgorithmPlusPlus``). [recon]

merging.md §9.6 names the variant ("features from the partially merged model … a different
method"); the procedure follows FusionBench's reference implementation (read with the search
tools; not copied): blocks are merged in forward order, and the Grams of block ``l`` for task
``t`` are recorded while task ``t``'s data run through the blocks ``< l`` *already merged*
and through expert ``t``'s own block ``l`` (so a linear layer inside the block sees the
expert's earlier layers of that block: the intra-layer dependency, and the merged earlier
blocks: the cross-layer one). Each block's linear layers are then solved by RegMean's closed
form ``W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁺`` with ``G̃_t = α·G_t + (1 − α)·diag(G_t)``; every other
tensor (embeddings, norms) is the mean of the task vectors from the start, as in RegMean.

A *block* is the prefix ``…layer.<i>``/``…layers.<i>``/``…blocks.<i>``/``…h.<i>`` of a linear
layer's module name (a transformer layer); a linear layer outside such a prefix is a block
of its own. Blocks are taken in module order. Each block costs one pass of each task's
examples, stopped after the block: about (blocks + 1) / 2 RegMean statistics passes in all.
Grams depend on the merged earlier blocks, so they are not stored (no ``stats``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, as_samples, progress_bar
from splice.merge.learned._functional import Forward, Network, TaskVectors, resolve_device, to_cpu
from splice.merge.learned._lot_layers import Layer, feed
from splice.merge.learned.lot import _close_task, _solve
from splice.merge.learned.regmean import _linear_layers, shrink

__all__ = ["Params", "blocks", "regmean_plusplus"]

_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|blocks|block|h|resblocks)\.\d+)(?:\.|$)")


class Params(HyperParams):
    alpha: float = Field(0.9, ge=0, le=1, description="off-diagonal Gram scale (1: plain LS)")
    num_samples: int = Field(256, ge=1, description="unlabeled examples per task")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")
    rtol: float = Field(1e-10, ge=0, description="pseudo-inverse cut-off relative to ‖G‖")


class _Stop(Exception):
    """Raised by the hook after the current block: the rest of the forward is not needed."""


def blocks(layers: Mapping[str, Layer]) -> dict[str, list[str]]:
    """``{block prefix: [layer keys]}`` in module order (a layer outside every block prefix
    is its own block, keyed by its module name)."""
    out: dict[str, list[str]] = {}
    for key, lay in layers.items():
        m = _BLOCK.match(lay.module)
        out.setdefault(m.group(1) if m else lay.module, []).append(key)
    return out


def regmean_plusplus(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    *,
    forward: Forward | None = None,
    rows: Callable[[Any], Tensor] | None = None,
    alpha: float = 0.9,
    num_samples: int = 256,
    batch_size: int = 32,
    rtol: float = 1e-10,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Merge by RegMean++ from ``data`` ({task: unlabeled inputs}).

    Returns the merged tensors; ``info`` has the blocks in order, the tensors solved and
    averaged, and the seconds spent collecting statistics.

    Raises:
        SpliceError: a task without data.
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward)
    layers = _linear_layers(module, set(tv.names))
    order = blocks(layers)
    samples = {t: as_samples(data[t], t) if t in data else None for t in tv.tasks}
    missing = [t for t, s in samples.items() if s is None]
    if missing:
        from splice.errors import SpliceError

        raise SpliceError(f"RegMean++: no data for task(s) {missing}", fix="pass data={task: x}")
    # Every tensor starts at the mean of the task vectors; solved blocks replace theirs.
    current = {n: tv.base[n] + tv.stacked[n].mean(0) for n in tv.names}
    solved: list[str] = []
    stat_seconds = 0.0
    with torch.no_grad(), progress_bar("RegMean++ blocks", len(order), progress, None) as up:
        for b, (prefix, keys) in enumerate(order.items()):
            group = {k: layers[k] for k in keys}
            own = [n for n in tv.names if n == prefix or n.startswith(f"{prefix}.")]
            own += [n for k in keys for n in group[k].names() if n not in own]
            last = _last_module(module, prefix, group)
            t0 = time.perf_counter()
            for i, task in enumerate(tv.tasks):
                weights = {**current, **{n: tv.base[n] + tv.stacked[n][i] for n in own}}
                s = samples[task]
                assert s is not None
                count = min(num_samples, len(s))
                run = _stopping(net, weights, last)
                feed(module, group, run, s, count, batch_size, dev, rows)
                for lay in group.values():
                    if lay.task_stat is not None:
                        lay.task_stat = shrink(lay.task_stat, alpha)
                    _close_task(lay, tv, i)
            stat_seconds += time.perf_counter() - t0
            for lay in group.values():
                for name, part, value in _solve(lay, tv, 0.0, rtol):
                    merged = current[name] - tv.base[name]
                    if part is None:
                        merged = value.reshape(merged.shape).to(merged.dtype)
                    else:
                        merged = merged.clone()
                        merged[part] = value.reshape(merged[part].shape).to(merged.dtype)
                    current[name] = tv.base[name] + merged
                    solved.append(name)
            up(b + 1, 0.0)
    weights = {n: current[n].to(tv.base[n].dtype) for n in tv.names}
    info = {
        "tasks": list(tv.tasks),
        "blocks": list(order),
        "solved": sorted(set(solved)),
        "averaged": sorted(set(tv.names) - set(solved)),
        "num_samples": num_samples,
        "stats_seconds": stat_seconds,
        "seconds": time.perf_counter() - start,
    }
    return LearnedMerge(to_cpu(weights, tv.base), None, [], info)


def _last_module(module: nn.Module, prefix: str, group: Mapping[str, Layer]) -> nn.Module:
    """The module whose forward ends the block: the block itself when it is a submodule,
    else its (single) layer's module."""
    try:
        return module.get_submodule(prefix)
    except AttributeError:
        return module.get_submodule(next(iter(group.values())).module)


def _stopping(
    net: Network, weights: Mapping[str, Tensor], last: nn.Module
) -> Callable[[Any], None]:
    """``run(batch)``: the forward with ``weights``, stopped once ``last`` has run."""

    def stop(*_: Any) -> None:
        raise _Stop

    def run(batch: Any) -> None:
        handle = last.register_forward_hook(stop)
        try:
            net.features(dict(weights), batch)
        except _Stop:
            pass
        finally:
            handle.remove()

    return run


learned.register("regmean_plusplus")(
    LearnedMethod(
        name="regmean_plusplus",
        pretty_name="RegMean++",
        reference="https://arxiv.org/abs/2508.03121 (fusionbench.md §1.3) [recon]",
        fn=regmean_plusplus,
        Params=Params,
        data="unlabeled",
    )
)
