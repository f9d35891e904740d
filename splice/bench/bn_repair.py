"""Batch-norm repair of merged backbones in the benchmark (``MergeSpec.repair_bn``).

A merge of fine-tunes of a network with batch norm (EfficientNet-Lite0) shifts every BN's
input statistics; the running statistics, frozen during fine-tuning, then mis-normalise (the
merged model's activations drift layer after layer). The repair (splice's addition, after
REPAIR, Jordan et al. 2023; :mod:`splice.compress.batchnorm`) resets each BN's running
statistics so that the merged model's normalised BN outputs have the statistics the
fine-tunes' have, each on its own task: pooled over the tasks for one merged model, one
task's own for a model per task (EMR). It reads unlabeled validation inputs only (as the
data-driven merges do) and changes no weight: the merge's BN buffers only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NO_BN", "BNRepair", "has_batchnorm", "repairer"]

NO_BN = "no batch norm to repair"

# Validation inputs per task that set the statistics (the quick image suite keeps 150).
REPAIR_EXAMPLES = 128


def has_batchnorm(module: nn.Module) -> bool:
    from splice.compress.batchnorm import batchnorms

    return bool(batchnorms(module))


class BNRepair:
    """One suite's repair: each task's targets (its fine-tune on its validation inputs) are
    computed once, on first use."""

    def __init__(self, suite: Any, own: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.suite, self.own = suite, own
        self.encoder = suite.encoder
        self._targets: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        self._batches: dict[str, list[Any]] = {}

    def _forward(self, module: nn.Module, batch: Any) -> Tensor:
        return self.encoder.features(batch, None, module)

    def _module(self, weights: Mapping[str, Tensor]) -> nn.Module:
        module = copy.deepcopy(self.encoder.module)
        module.load_state_dict({**module.state_dict(), **weights})
        return module.eval()

    def batches(self, task: str) -> list[Any]:
        if task not in self._batches:
            data = self.suite.val[task]
            order = data.eval_order()[:REPAIR_EXAMPLES]
            device = next(self.encoder.module.parameters()).device
            size = self.suite.batch_size
            self._batches[task] = [
                data.batch(order[i : i + size], device) for i in range(0, len(order), size)
            ]
        return self._batches[task]

    def targets(self, task: str) -> dict[str, tuple[Tensor, Tensor]]:
        from splice.compress.batchnorm import bn_targets

        if task not in self._targets:
            ref = self._module(self.own[task])
            self._targets[task] = bn_targets(ref, self.batches(task), self._forward)
        return self._targets[task]

    def buffer_count(self) -> int:
        """Entries of the running means and variances one repaired model carries."""
        from splice.compress.batchnorm import batchnorms

        module = self.encoder.module
        return sum(2 * module.get_submodule(n).running_mean.numel() for n in batchnorms(module))

    @torch.no_grad()
    def __call__(self, merged: Mapping[str, Tensor], task: str | None = None) -> dict[str, Tensor]:
        """``merged`` with repaired BN buffers: for every task (pooled, one model) or for
        ``task`` alone (a model per task)."""
        from splice.compress.batchnorm import batchnorms, match_bn, pool_targets

        tasks = [task] if task is not None else list(self.suite.data)
        batches = [b for t in tasks for b in self.batches(t)]
        sizes = [min(len(self.suite.val[t]), REPAIR_EXAMPLES) for t in tasks]
        targets = pool_targets([self.targets(t) for t in tasks], sizes)
        module = self._module(merged)
        match_bn(module, batches, self._forward, targets)
        state = module.state_dict()
        out = dict(merged)
        for name in batchnorms(module):
            for buf in ("running_mean", "running_var"):
                out[f"{name}.{buf}"] = state[f"{name}.{buf}"].clone()
        return out


def repairer(
    suite: Any, own: Mapping[str, Mapping[str, Tensor]], specs: Sequence[Any]
) -> BNRepair | None:
    """The suite's repair if one of ``specs`` asks for it and the backbone has batch norm."""
    if not any(s.repair_bn for s in specs) or not has_batchnorm(suite.encoder.module):
        return None
    return BNRepair(suite, own)
