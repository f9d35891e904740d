"""Per-task data of the learned merges: examples, seeded batch streams, progress bars.

A task's data is a :class:`Samples`: ``inputs`` are a tensor whose rows are examples, or any
object with ``len()`` and ``batch(idx, device)`` (the benchmark's prepared splits); ``labels``
are optional (aTLAS' supervised objective needs them). Methods only ever see the data they are
given: pass training or validation examples, never test ones (fusionbench.md §3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["Progress", "Samples", "Stream", "as_samples", "chunks", "progress_bar", "streams"]

Progress = bool | Callable[[int, float], None]
"""``True``: a rich progress bar on stderr; a callable: ``on_step(step, objective)``."""


@dataclass(frozen=True)
class Samples:
    """A task's examples (``inputs``) and, optionally, their integer ``labels``."""

    inputs: Any
    labels: Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0]) if isinstance(self.inputs, Tensor) else len(self.inputs)

    def take(self, idx: np.ndarray, device: torch.device) -> tuple[Any, Tensor | None]:
        """The batch of examples ``idx`` on ``device``, and their labels (or None)."""
        if isinstance(self.inputs, Tensor):
            batch = self.inputs[torch.from_numpy(idx)].to(device)
        else:
            batch = self.inputs.batch(idx, device)
        labels = None if self.labels is None else self.labels[torch.from_numpy(idx)].to(device)
        return batch, labels


def as_samples(x: Any, task: str = "") -> Samples:
    """``Samples`` from a Samples, a tensor, an ``(inputs, labels)`` pair or a prepared split.

    Raises:
        SpliceError: anything else, or labels whose length differs from the inputs'.
    """
    if isinstance(x, Samples):
        out = x
    elif isinstance(x, tuple) and len(x) == 2:
        labels = torch.as_tensor(np.asarray(x[1]), dtype=torch.long)
        out = Samples(as_samples(x[0], task).inputs, labels)
    elif isinstance(x, Tensor) or (hasattr(x, "batch") and hasattr(x, "__len__")):
        out = Samples(x)
    else:
        raise SpliceError(
            f"task {task!r}: data of type {type(x).__name__} is not supported",
            fix="pass a tensor of inputs, an (inputs, labels) pair, or an object with "
            "len() and batch(idx, device)",
        )
    if out.labels is not None and len(out.labels) != len(out):
        raise SpliceError(f"task {task!r}: {len(out.labels)} labels for {len(out)} inputs")
    if len(out) == 0:
        raise SpliceError(f"task {task!r}: no examples")
    return out


class Stream:
    """Endless shuffled batches of one task: a fresh permutation every pass, seeded."""

    def __init__(self, samples: Samples, batch_size: int, seed: Sequence[int]) -> None:
        self.samples = samples
        self.batch_size = min(batch_size, len(samples))
        self.rng = np.random.default_rng(list(seed))
        self.order = np.empty(0, dtype=np.int64)

    def next(self, device: torch.device) -> tuple[Any, Tensor | None, np.ndarray]:
        """(batch, labels or None, example indices)."""
        if len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.samples))])
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return (*self.samples.take(idx, device), idx)


def streams(
    data: Mapping[str, Any], tasks: Sequence[str], batch_size: int, seed: int
) -> dict[str, Stream]:
    """One :class:`Stream` per task (seeded by (seed, task index)).

    Raises:
        SpliceError: a task has no data.
    """
    missing = [t for t in tasks if t not in data]
    if missing:
        raise SpliceError(f"no data for task(s) {missing}", fix="pass data={task: examples}")
    return {t: Stream(as_samples(data[t], t), batch_size, (seed, i)) for i, t in enumerate(tasks)}


def chunks(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches ``0..n-1`` in order (for passes over a fixed set of examples)."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


@contextmanager
def progress_bar(
    description: str, total: int, progress: Progress, label: str | None = "objective"
) -> Iterator[Callable[[int, float], None]]:
    """Yields ``update(step, value)``: a rich bar (showing ``label value`` unless ``label`` is
    None), the caller's callback, or nothing."""
    if callable(progress):
        yield progress
        return
    if not progress:
        yield lambda step, value: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[value]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        tid = bar.add_task(description, total=total, value="")

        def update(step: int, value: float) -> None:
            bar.update(tid, completed=step, value=f"{label} {value:.4f}" if label else "")

        yield update
