"""One backbone's tasks for one seed, and the accuracy of a weight set on them.

Every task is evaluated with its own head on pooled features of the backbone with the given
weights replacing the pretrained tensors of the same names (length-sorted batches, no
autograd). Accuracies are remembered by the weights' content, so a weight set evaluated again
(a continual method's last step is its merge row; a value tuned twice) is not recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from splice.bench.finetune import Head, TaskRun
from splice.data.encoders import Encoder, Prepared
from splice.data.registry import TaskData

__all__ = ["Suite"]


@torch.inference_mode()
def _features(
    encoder: Encoder,
    data: Prepared,
    weights: Mapping[str, Tensor] | None,
    batch_size: int,
    module: torch.nn.Module | None = None,
) -> Tensor:
    """Pooled features of every example, in order: of ``module`` (default: the encoder's),
    with ``weights`` replacing its tensors of the same names."""
    device = next(encoder.module.parameters()).device
    order = data.eval_order()
    out = torch.empty(len(data), encoder.dim)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = data.batch(idx, device)
        out[torch.as_tensor(idx)] = encoder.features(batch, weights, module).float().cpu()
    return out


def _accuracy(head: Head, feats: Tensor, labels: np.ndarray) -> float:
    pred = head(feats).argmax(-1).numpy()
    return float((pred == labels).mean())


def _digest(weights: Mapping[str, Tensor] | None) -> str:
    """Identifies a weight set by content: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights or {}):
        t = weights[name].detach().cpu().contiguous()  # type: ignore[index]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class Suite:
    """One backbone's tasks for one seed: data, prepared inputs, runs, base tensors.

    Accuracies are remembered by the weights' content: a weight set evaluated again (a
    continual method's last step is its merge row, a value tuned twice) costs nothing."""

    encoder: Encoder
    data: dict[str, TaskData]
    val: dict[str, Prepared]
    test: dict[str, Prepared]
    runs: dict[str, TaskRun] = field(default_factory=dict)
    batch_size: int = 128
    memo: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def acc(
        self,
        weights: Mapping[str, Tensor] | None,
        split: str = "test",
        tasks: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Accuracy of one backbone weight set on ``tasks`` (all), each with its own head."""
        sets = self.test if split == "test" else self.val
        digest = _digest(weights)
        out = {}
        for t in tasks or self.data:
            key = (digest, split, t)
            if key not in self.memo:
                feats = _features(self.encoder, sets[t], weights, self.batch_size)
                labels = getattr(self.data[t], split).y
                self.memo[key] = _accuracy(self.runs[t].head, feats, labels)
            out[t] = self.memo[key]
        return out
