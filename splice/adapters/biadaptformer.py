"""Bi-AdaptFormer: an AdaptFormer-style parallel adapter whose Down and Up are trained and
stored at ``b`` bits (Jie, Wang, Deng; ICCV 2023) — spec peft.md §14.

Per block, parallel to the FFN sublayer: ``Δ = s·Up_q(Dropout(ReLU(Down_q(x))))`` added to the
FFN's output, no biases, ``Down: d → r``, ``Up: r → d`` (the spec's h_a is ``r``, default 32).
Each matrix W is used as W_q = Q_b((W − μ)/(σ + 1e-5))·σ + μ with the normal-codebook
quantiser of :mod:`splice.adapters._bits` (b = 1: ±0.6745), straight-through in backward —
the same quantiser and packed file layout as Bi-LoRA (:class:`~splice.adapters._bits.
PackedMatrices`). Down is Kaiming-uniform; Up ~ TruncNormal(0, up_std², ±2·up_std), non-zero
because standardising a zero matrix divides by zero, so the model moves slightly at step 0
(``identity_at_init = False``). ``dropout`` (default 0.1, the paper's) acts on the hidden code,
not on the adapter input. Built on :class:`~splice.adapters.parallel.ParallelAdapter` through
its ``make_bottleneck`` hook: the sites, sublayer options and input tap are the parallel
adapter's. [recon] the paper's input is the un-normalised residual stream h; the tap reads the
FFN's input, which is h on post-LN blocks (BERT, MiniLM) and LN(h) on pre-LN blocks (Llama).
Trainable parameters per site: ``r·(d_in + d_out)`` latent fp32 entries (``2·d·r``), plus 1
with ``learn_scale``; stored at b/8 bytes per entry plus 16 bytes (μ, σ of each) per site.
"""

from __future__ import annotations

import pydantic
from torch import Tensor, nn

from ._bits import PackedMatrices, small_nonzero_
from ._sites import Site
from .layer import METHODS, Adapter
from .parallel import Bottleneck, BottleneckConfig, ParallelAdapter, ParallelMethod

__all__ = ["BiAdaptFormerAdapter", "BiAdaptFormerConfig", "BinaryBottleneck"]


class BiAdaptFormerConfig(BottleneckConfig):
    r: int = pydantic.Field(32, gt=0, description="bottleneck width h_a")
    bits: int = pydantic.Field(1, ge=1, le=8, description="bits per stored matrix entry")
    up_std: float = pydantic.Field(
        1e-3, gt=0, description="std of Up's truncated-normal init (cut at ±2 std)"
    )
    dropout: float = pydantic.Field(
        0.1, ge=0.0, lt=1.0, description="dropout on the hidden code (after the activation)"
    )


class BinaryBottleneck(PackedMatrices, Bottleneck):
    """``x ↦ s·Up_q(Dropout(f(Down_q(x))))``: the bottleneck with quantised, bias-free
    matrices; saves as packed codes (:class:`~splice.adapters._bits.PackedMatrices`)."""

    packed_roles = ("down", "up")

    def __init__(self, d_in: int, d_out: int, cfg: BiAdaptFormerConfig) -> None:
        super().__init__(d_in, d_out, cfg, bias=False, dropout=cfg.dropout)
        self.bits = cfg.bits
        if cfg.init == "lora":  # Up = 0 cannot be standardised
            small_nonzero_(self.up.data, cfg.up_std)

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.quantised("down"), self.quantised("up")


class BiAdaptFormerAdapter(ParallelAdapter):
    """The parallel adapter with a :class:`BinaryBottleneck`; its file holds the packed form."""

    def __init__(self, site: Site, cfg: BiAdaptFormerConfig) -> None:
        super().__init__(site, cfg)
        self.dropout = nn.Identity()  # the dropout acts inside the bottleneck, not on x

    def make_bottleneck(self, d_in: int, d_out: int, cfg: BottleneckConfig) -> Bottleneck:
        assert isinstance(cfg, BiAdaptFormerConfig)
        return BinaryBottleneck(d_in, d_out, cfg)

    def saved_tensors(self) -> dict[str, Tensor]:
        return self.bottleneck.saved_tensors()

    def load_saved(self, tensors: dict[str, Tensor], where: str) -> None:
        self.bottleneck.load_saved(tensors, where)


@METHODS.register("biadaptformer")
class BiAdaptFormer(ParallelMethod):
    pretty_name = "Bi-AdaptFormer (1-bit)"
    reference_url = "https://arxiv.org/abs/2307.16867"
    Config = BiAdaptFormerConfig
    adapter_class: type[Adapter] = BiAdaptFormerAdapter
    identity_at_init = False  # Up must be non-zero for the standardisation

    def num_parameters(self, sites: list[Site], cfg: BiAdaptFormerConfig) -> int:
        return sum(cfg.r * (s.d_in + s.d_out) + int(cfg.learn_scale) for s in sites)
