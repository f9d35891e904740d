"""MAM adapter (He et al., ICLR 2022) — spec peft.md §16: prefix tuning at attention plus a
scaled parallel adapter at the FFN, as a *composition* of :mod:`.prefix` and :mod:`.parallel`
(their sites, adapters, hooks and saved forms; nothing re-implemented here).

Defaults are the paper's GLUE setting (RoBERTa): prefix ``tokens=16``, parallel ``r=16``,
``scale=2``, no LayerNorm, lora init (Up = 0); its XSum/MT setting is ``tokens=30, r=512,
scale=4``. The output equals the prefix model's plus the FFN adapter's (tested). Trainable
parameters: the prefix's count plus the parallel adapter's.
"""

from __future__ import annotations

import pydantic

from .layer import METHODS, Adapter, Method
from .parallel import ParallelConfig, ParallelMethod
from .prefix import PrefixAdapter, PrefixConfig, PrefixTuning

__all__ = ["MAMConfig"]


class MAMConfig(PrefixConfig, ParallelConfig):
    scale: float = pydantic.Field(2.0, description="the FFN adapter's scale s (GLUE: 2)")


@METHODS.register("mam")
class MAM(Method):
    shares_model = False
    pretty_name = "MAM adapter (prefix + scaled parallel)"
    reference_url = "https://arxiv.org/abs/2110.04366"
    family = "hybrid"
    Config = MAMConfig
    kinds = frozenset({"attention"})  # it needs attention; its FFN sites are Linear layers
    mergeable = False
    lowrank = False
    identity_at_init = False

    def __init__(self) -> None:
        self.prefix, self.parallel = PrefixTuning(), ParallelMethod()

    def find(self, model, targets, layers, cfg):
        return self.prefix.find(model, targets, layers, cfg) + self.parallel.find(
            model, targets, layers, cfg
        )

    def _split(self, items):
        attn = [i for i in items if getattr(i, "kind", None) == "attention"]
        return attn, [i for i in items if getattr(i, "kind", None) != "attention"]

    def build(self, sites, cfg: MAMConfig) -> list[Adapter]:
        attn, ffn = self._split(sites)
        return [*self.prefix.build(attn, cfg), *self.parallel.build(ffn, cfg)]

    def attached(self, model, adapters, cfg: MAMConfig) -> None:
        prefix = [a for a in adapters if isinstance(a, PrefixAdapter)]
        self.prefix.attached(model, prefix, cfg)
        self.parallel.attached(model, [a for a in adapters if a not in prefix], cfg)

    def num_parameters(self, sites, cfg: MAMConfig) -> int:
        attn, ffn = self._split(sites)
        return self.prefix.num_parameters(attn, cfg) + self.parallel.num_parameters(ffn, cfg)

    def export(self, model, config, tensors):
        return self.prefix.export(model, config, tensors)
