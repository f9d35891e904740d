"""Sequential LoRA: one LoRA trained on every task in turn — the forgetting baseline.

Each task continues from the adapter the previous task left (a new head per task); nothing
protects earlier tasks, so their accuracy with their own heads shows what is forgotten.
Stored: one LoRA, ``r(d_in + d_out)`` per adapted matrix, whatever the task count.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydantic
import torch
from torch import Tensor, nn

from splice._schema import Strict
from splice.adapters import adapter_layers, inject
from splice.adapters.lora import LoRAAdapter

from .base import CONTINUAL, ContinualMethod, Phase, Stored, count

__all__ = ["LoRAConfig", "SequentialLoRA"]


class LoRAConfig(Strict):
    r: int = pydantic.Field(8, gt=0, description="rank")
    alpha: float = pydantic.Field(16.0, description="scale numerator: s = alpha/r")


@CONTINUAL.register("sequential_lora")
class SequentialLoRA(ContinualMethod):
    pretty_name = "Sequential LoRA (forgetting baseline)"
    reference_url = "https://arxiv.org/abs/2106.09685"
    Config = LoRAConfig
    cfg: LoRAConfig

    def __init__(self, cfg: LoRAConfig) -> None:
        super().__init__(cfg)
        self.adapters: dict[str, LoRAAdapter] = {}

    def attach(self, model: nn.Module, targets: Sequence[str] | str) -> None:
        inject(model, "lora", targets, r=self.cfg.r, alpha=self.cfg.alpha)
        self.adapters = {n: layer.adapter for n, layer in adapter_layers(model).items()}  # type: ignore[misc]

    def params(self) -> list[nn.Parameter]:
        return [p for ad in self.adapters.values() for p in (ad.lora_A, ad.lora_B)]

    def start_task(self, task: str) -> list[Phase]:
        return [Phase("lora", 1.0, self.params())]

    def state(self) -> dict[str, Tensor]:
        return {
            f"{n}.{k}": getattr(ad, k).detach().cpu().contiguous()
            for n, ad in self.adapters.items()
            for k in ("lora_A", "lora_B")
        }

    def load_state(self, state: dict[str, Tensor], tasks: Sequence[str]) -> None:
        with torch.no_grad():
            for n, ad in self.adapters.items():
                for k in ("lora_A", "lora_B"):
                    getattr(ad, k).copy_(state[f"{n}.{k}"])
        self.tasks = list(tasks)

    def stored(self) -> Stored:
        return count(self.params())
