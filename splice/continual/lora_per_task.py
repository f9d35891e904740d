"""One LoRA per task: a fresh adapter for every task, kept apart — the storage-heavy bound.

No task touches another's adapter, so nothing is forgotten (BWT = 0 up to evaluation
noise) and every task costs a whole LoRA: ``T·r(d_in + d_out)`` per adapted matrix after
``T`` tasks. :meth:`LoRAPerTask.deltas` hands each task's ΔW to the merge-based continual
methods (OPCM, continual task arithmetic) so they start from the same adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.adapters._primitives import kaiming_uniform
from splice.deltas import LowRank

from .base import CONTINUAL, Phase, Stored, count
from .sequential_lora import SequentialLoRA

__all__ = ["LoRAPerTask"]


@CONTINUAL.register("lora_per_task")
class LoRAPerTask(SequentialLoRA):
    pretty_name = "One LoRA per task (upper bound, T adapters stored)"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.saved: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # task → site → (A, B)

    def start_task(self, task: str) -> list[Phase]:
        with torch.no_grad():  # a fresh LoRA: A ~ U(±1/√d_in), B = 0
            for ad in self.adapters.values():
                kaiming_uniform(ad.lora_A)
                ad.lora_B.zero_()
        return super().start_task(task)

    def end_task(self, task: str) -> None:
        self.saved[task] = {
            n: (ad.lora_A.detach().clone(), ad.lora_B.detach().clone())
            for n, ad in self.adapters.items()
        }
        super().end_task(task)

    def use_task(self, task: str) -> None:
        with torch.no_grad():
            for n, ad in self.adapters.items():
                a, b = self.saved[task][n]
                ad.lora_A.copy_(a)
                ad.lora_B.copy_(b)

    def deltas(self, task: str) -> dict[str, LowRank]:
        """Task ``task``'s ΔW per base tensor name (``<module>.weight``)."""
        return {
            f"{n}.weight": ad.site.lowrank(b.cpu(), a.cpu(), ad.scale)
            for n, ad in self.adapters.items()
            for a, b in [self.saved[task][n]]
        }

    def state(self) -> dict[str, Tensor]:
        return {
            f"{n}.{k}.{i}": t.cpu().contiguous()
            for i, task in enumerate(self.tasks)
            for n, (a, b) in self.saved[task].items()
            for k, t in (("lora_A", a), ("lora_B", b))
        }

    def load_state(self, state: dict[str, Tensor], tasks: Sequence[str]) -> None:
        dev = next(iter(self.adapters.values())).lora_A.device
        self.saved = {
            t: {
                n: (state[f"{n}.lora_A.{i}"].to(dev), state[f"{n}.lora_B.{i}"].to(dev))
                for n in self.adapters
            }
            for i, t in enumerate(tasks)
        }
        self.tasks = list(tasks)

    def stored(self) -> Stored:
        return count([t for site in self.saved.values() for p in site.values() for t in p])
