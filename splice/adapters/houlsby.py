"""Serial (Houlsby) adapter — spec peft.md §16, the unified view's "sequential" row.

``h ← h + Up(f(Down(h)))`` on a sublayer's *output* ``h`` (before the residual add), with f =
ReLU and Up = 0 at init (output = base at step 0; Houlsby et al. 2019 start near identity).
``sublayer``: ``"both"`` (default: after attention and after the FFN, as Houlsby), ``"ffn"``,
``"attn"`` or ``"site"`` (the matched layers). It is the parallel adapter's
:class:`~splice.adapters.parallel.Bottleneck` fed from the output instead of the input.
Trainable parameters per site: ``2·d·r + r + d`` (d = the sublayer's output width).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from .layer import METHODS
from .parallel import BottleneckConfig, ParallelAdapter, _BottleneckMethod

__all__ = ["HoulsbyConfig", "SerialAdapter"]


class HoulsbyConfig(BottleneckConfig):
    sublayer: Literal["ffn", "attn", "both", "site"] = pydantic.Field(
        "both", description="after attention and FFN (Houlsby), one of them, or the matched layers"
    )


class SerialAdapter(ParallelAdapter):
    """``y + Bottleneck(y)``: the bottleneck reads the sublayer's output."""

    reads = "output"


@METHODS.register("houlsby")
class Houlsby(_BottleneckMethod):
    pretty_name = "Serial adapter (Houlsby)"
    reference_url = "https://arxiv.org/abs/1902.00751"
    Config = HoulsbyConfig
    adapter_class = SerialAdapter
    tap = False

    def num_parameters(self, sites, cfg) -> int:
        from .parallel import Bottleneck

        return sum(Bottleneck.count(s.d_out, s.d_out, cfg) for s in sites)
