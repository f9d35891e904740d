"""P-tuning (Liu et al., 2021) — prompt tuning whose virtual-token embeddings come from a
prompt encoder, peft's MLP form ``Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)``
over ``tokens`` learned inputs. Same input hook as :mod:`.prompt` (one mechanism). Saving
materialises the encoder's output and drops the encoder, so a saved P-tuning adapter is a
plain ``prompt`` (as peft saves ``P_TUNING``: ``prompt_embeddings``).
Trainable parameters: ``l·d + (d·h + h) + (h·h + h) + (h·d + d)``.
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from .layer import METHODS, Adapter
from .prompt import PromptAdapter, PromptConfig, PromptMethod

__all__ = ["PTuningAdapter", "PTuningConfig"]


class PTuningConfig(PromptConfig):
    hidden: int = pydantic.Field(128, gt=0, description="the prompt encoder's hidden width")


class PTuningAdapter(PromptAdapter):
    def __init__(self, site, cfg: PTuningConfig, weight: Tensor | None) -> None:
        super().__init__(site, cfg, weight)
        d, h = self.prompt.shape[1], cfg.hidden
        self.encoder = nn.Sequential(
            nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
        )

    def embeddings(self) -> Tensor:
        return self.encoder(self.prompt)


@METHODS.register("ptuning")
class PTuning(PromptMethod):
    pretty_name = "P-tuning (prompt encoder)"
    reference_url = "https://arxiv.org/abs/2103.10385"
    Config = PTuningConfig

    def adapter(self, site, cfg) -> Adapter:
        return PTuningAdapter(site, cfg, self.weights.get(site.name))

    def num_parameters(self, sites, cfg: PTuningConfig) -> int:
        h = cfg.hidden
        return sum(cfg.tokens * s.d_out + 2 * (s.d_out * h) + h * h + 2 * h + s.d_out
                   for s in sites)  # fmt: skip

    def export(self, model, config, tensors):
        from .inject import adapter_layers

        tensors = {k: v for k, v in tensors.items() if ".adapter.encoder." not in k}
        with torch.no_grad():
            for name, layer in adapter_layers(model).items():
                if isinstance(layer.adapter, PTuningAdapter):
                    tensors[f"{name}.adapter.prompt"] = layer.adapter.embeddings().detach().float()
        options = {k: v for k, v in config["config"].items() if k != "hidden"}
        return {**config, "method": "prompt", "config": options}, tensors
