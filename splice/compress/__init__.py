"""Post-training quantization: AdaQuant, integer-programmed mixed precision, BN and bias
tuning (spec other.md §4; Hubara et al. 2021). One file per piece:

``quantizer`` (learnable range/zero point, STE), ``qlayer`` (the quantized layer), ``capture``
(forward hooks), ``lockstep`` (one paused forward per batch for all layers), ``spill`` (float
layer outputs on disk), ``adaquant`` (per-layer reconstruction), ``profile`` (the ΔL table),
``allocate`` (the integer program), ``batchnorm``, ``bias``, ``size``, ``config`` (what a run
is asked and reports), ``pipeline`` (light and advanced), ``resume`` (a run's calibrated
layers on disk, to go on after a stop), ``files`` (integer weights in safetensors, and the
dequantising loader) and ``qbase`` (a quantized frozen base under adapters, QLoRA-style).
"""

from __future__ import annotations

from .adaquant import AdaQuantConfig, adaquant_problem, layer_mse
from .allocate import allocate, bops_cost, size_cost
from .batchnorm import bn_targets, match_bn, pool_targets, reestimate_bn
from .bias import bias_problem, kl_to_target, mean_shift
from .capture import capture, execution_order
from .config import QuantizeConfig, QuantizeReport
from .pipeline import QuantizeStopped, quantize, quantize_sizes
from .profile import sensitivity
from .qbase import quantize_base
from .qlayer import QuantLayer, quant_layers, quantizable, wrap
from .quantizer import FakeQuant, fake_quant
from .size import model_bits

__all__ = [
    "AdaQuantConfig",
    "FakeQuant",
    "QuantLayer",
    "QuantizeConfig",
    "QuantizeReport",
    "QuantizeStopped",
    "adaquant_problem",
    "allocate",
    "bias_problem",
    "bn_targets",
    "bops_cost",
    "capture",
    "execution_order",
    "fake_quant",
    "kl_to_target",
    "layer_mse",
    "match_bn",
    "mean_shift",
    "model_bits",
    "pool_targets",
    "quant_layers",
    "quantizable",
    "quantize",
    "quantize_base",
    "quantize_sizes",
    "reestimate_bn",
    "sensitivity",
    "size_cost",
    "wrap",
]
