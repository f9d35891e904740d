"""Deterministic batches for ``splice train``: batch ``i`` is a pure function of (seed, i).

Epoch e visits a permutation seeded by (seed, e); under DDP, rank r of w reads slice r of each
global batch. With a task per row (multi-task data and a method that routes by task, such as
EPT), every global batch holds rows of one task: epoch e cuts each task's seeded permutation
into global batches and visits all of them in a seeded order, so each row is seen once per
epoch and a task gets batches in proportion to its rows. The released EPT loader also draws
each batch from one task, choosing the task at random per batch.
"""

from __future__ import annotations

import torch

__all__ = ["Batches", "collate"]


def collate(idx: list[int], encoded: list[list[int]], labels: list[int] | None, pad_id: int):
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (-100 on causal-LM padding)."""
    width = max(len(encoded[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
        mask[row, : len(encoded[i])] = 1
    if labels is None:
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([labels[i] for i in idx]),
    }


class Batches:
    """Micro-batch ``i`` → ``(task id or None, batch)``; ``tasks`` gives each row's task id
    (then every global batch holds one task's rows), or None for mixed batches."""

    def __init__(
        self,
        encoded: list[list[int]],
        labels: list[int] | None,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
        tasks: list[int] | None = None,
    ) -> None:
        self.encoded, self.labels, self.pad_id = encoded, labels, pad_id
        self.bs, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.groups: dict[int, list[int]] = {}
        for row, task in enumerate(tasks or []):
            self.groups.setdefault(task, []).append(row)
        glob = self.bs * world
        if tasks is None:
            self.per_epoch = max(1, len(encoded) // glob)
        else:  # a task smaller than one global batch still gets one (smaller) batch
            self.per_epoch = sum(max(1, len(rows) // glob) for rows in self.groups.values())

    def __call__(self, i: int) -> tuple[int | None, dict[str, torch.Tensor]]:
        epoch, pos = divmod(i, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if not self.groups:
            perm = torch.randperm(len(self.encoded), generator=g)
            start = (pos * self.world + self.rank) * self.bs
            return None, self._collate(perm[start : start + self.bs].tolist())
        glob, order = self.bs * self.world, []
        for task, rows in sorted(self.groups.items()):
            perm = torch.randperm(len(rows), generator=g).tolist()
            for b in range(max(1, len(rows) // glob)):
                order.append((task, [rows[j] for j in perm[b * glob : (b + 1) * glob]]))
        task, rows = order[torch.randperm(len(order), generator=g)[pos]]
        return task, self._collate(rows[self.rank * self.bs : (self.rank + 1) * self.bs])

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return collate(idx, self.encoded, self.labels, self.pad_id)
