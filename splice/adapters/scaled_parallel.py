"""Scaled parallel adapter (He et al., ICLR 2022) — spec peft.md §16: the parallel adapter of
:mod:`.parallel` with output scale ``s = 4`` (the paper's MAM setting; ``learn_scale`` trains
it). Trainable parameters per site: ``r·d_in + r + r·d_out + d_out``."""

from __future__ import annotations

import pydantic

from .layer import METHODS
from .parallel import ParallelConfig, ParallelMethod

__all__ = ["ScaledParallelConfig"]


class ScaledParallelConfig(ParallelConfig):
    scale: float = pydantic.Field(4.0, description="output scale s (the paper's MAM: 4)")


@METHODS.register("scaled_parallel")
class ScaledParallelMethod(ParallelMethod):
    pretty_name = "Scaled parallel adapter"
    Config = ScaledParallelConfig
