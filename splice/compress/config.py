"""What a quantization run is asked for (:class:`QuantizeConfig`, spec other.md §4) and what it
reports (:class:`QuantizeReport`: bits per layer, sizes, calibration losses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from splice._schema import Strict
from splice.compress.adaquant import AdaQuantConfig
from splice.compress.qlayer import check_bits
from splice.errors import SpliceError

__all__ = ["LayerReport", "QuantizeConfig", "QuantizeReport"]


class QuantizeConfig(Strict):
    """What to quantize to and how (spec other.md §4; defaults: the paper's code)."""

    bits: int | None = Field(None, description="weight bits of every layer (2–8); or size")
    size: float | None = Field(None, description="target size as a fraction of FP32 (IP)")
    pipeline: Literal["light", "advanced"] = "advanced"
    a_bits: int | None = Field(8, description="input (activation) bits; None keeps them float")
    options: tuple[int, ...] = Field((4, 8), description="bit options of the integer program")
    base_bits: int = Field(8, description="the precision the sensitivity is measured against")
    ends_bits: int | None = Field(8, description="bits of the first and last layer; None: as all")
    mode: Literal["sequential", "parallel"] = "sequential"
    cost: Literal["size", "bops"] = Field("size", description="what the size target limits")
    adaquant: AdaQuantConfig = AdaQuantConfig()
    bn: bool = Field(True, description="re-estimate batch-norm statistics")
    bias_steps: int = Field(600, ge=0, description="bias-tuning SGD steps (advanced)")
    bias_lr: float = 0.1
    exclude: tuple[str, ...] = Field((), description="layer names or suffixes to keep float")
    relu: tuple[str, ...] = Field((), description="layers a ReLU follows (AdaQuant's g)")
    profile_batches: int = Field(8, ge=1, description="calibration batches per sensitivity test")
    spill_dir: str | None = Field(
        None, description="where sequential mode keeps the float layer outputs (default: TMPDIR)"
    )

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        if (self.bits is None) == (self.size is None):
            raise SpliceError(
                "give exactly one of bits and size", fix="e.g. --bits 4 or --size 0.13"
            )
        if self.bits is not None:
            check_bits(self.bits)
        if self.size is not None and not 0 < self.size <= 1:
            raise SpliceError(f"size {self.size} is not a fraction", fix="use a value in (0, 1]")
        for b in self.options:
            check_bits(b, "bit option")
        check_bits(self.base_bits, "base bits")
        check_bits(self.ends_bits or 8, "ends bits")
        check_bits(self.a_bits or 8, "activation bits")
        return self


@dataclass
class LayerReport:
    name: str
    bits: int
    a_bits: int | None
    weights: int
    mse_before: float | None = None
    mse_after: float | None = None
    seconds: float = 0.0


@dataclass
class QuantizeReport:
    """Chosen bits per layer, sizes and calibration losses (KL/MSE to the FP outputs)."""

    layers: list[LayerReport] = field(default_factory=list)
    fp32_bits: int = 0
    bits: int = 0  # quantized weights + scales/zero points + float tensors
    loss: dict[str, float] = field(default_factory=dict)  # stage → calibration loss
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.bits / max(self.fp32_bits, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction, "bytes": self.bits // 8}
