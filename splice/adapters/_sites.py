"""Adapter sites: the geometry of one adapted layer, as seen by every low-rank method.

A method describes its change at a site as ΔW = s·B@A in the canonical 2-D layout
B (d_out, R), A (R, d_in), where ``d_in`` is the flattened fan-in. The site turns that into the
layer's own operations: ``down`` (x ↦ h, the rank-R code of the input), ``up_add`` (y += s·h↦B)
and ``lowrank`` (a :class:`splice.deltas.LowRank` in the base weight's layout). So the five
methods never special-case Linear, Conv, Embedding or GPT-2's ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.deltas import LowRank
from splice.errors import SpliceError

__all__ = ["Site", "frozen_linear", "make_site"]


@dataclass(frozen=True)
class Site:
    """One adapted layer: its name, layer index, pool group and flattened dims."""

    kind: ClassVar[str] = ""
    channel_dim: ClassVar[int] = -1  # where the rank-R code lives in ``down``'s output
    takes_dropout: ClassVar[bool] = True

    name: str
    layer: int | None
    group: str
    d_in: int
    d_out: int
    weight_shape: tuple[int, ...]

    def weight(self, module: nn.Module) -> nn.Parameter:
        w = getattr(module, "weight", None)
        if not isinstance(w, Tensor):  # splice.compress's QuantLayer: codes, a step, a zero
            raise SpliceError(
                f"the base layer ({type(module).__name__}) holds no float weight (a quantized "
                "base keeps only its codes): none to merge into, none for the method to read",
                where=self.name,
                fix="merge the saved adapter into the unquantized model; on a quantized base "
                "train a method that does not read the base weight (LoRA, not DoRA)",
            )
        return w

    def down(self, x: Tensor, A: Tensor) -> Tensor:
        """x ↦ x·Aᵀ for the layer's input layout; A is (R, d_in)."""
        return F.linear(x, A.to(x.dtype))

    def up_add(self, y: Tensor, h: Tensor, B: Tensor, scale: float) -> Tensor:
        """y + scale · h·Bᵀ as one GEMM that accumulates onto y (``addmm``, beta 1).

        Out of place: an in-place ``addmm_`` on a view of y makes autograd copy the gradient
        through ``CopySlices`` in backward, which cost 6 % of a MiniLM-L6 LoRA step on an H200
        (paired: 0.95× peft out of place, 1.01× in place; the same on the CPU).
        """
        flat = torch.addmm(
            y.reshape(-1, y.shape[-1]),
            h.reshape(-1, h.shape[-1]).to(y.dtype),
            B.t().to(y.dtype),
            alpha=scale,
        )
        return flat.view(y.shape)

    def lowrank(self, B: Tensor, A: Tensor, scale: float) -> LowRank:
        return LowRank(B, A, scale, self.weight_shape)

    def canonical(self, w: Tensor) -> Tensor:
        """The stored weight as (d_out, d_in), a view; :meth:`stored` is its inverse."""
        return w.reshape(self.d_out, -1)

    def stored(self, m: Tensor) -> Tensor:
        return m.reshape(self.weight_shape)

    def per_out(self, v: Tensor, y: Tensor) -> Tensor:
        """A per-output-channel vector ``v`` shaped to broadcast over the output ``y``."""
        return v.to(y.dtype)


class LinearSite(Site):
    kind = "linear"


class Conv1DSite(Site):
    """HF GPT-2 ``Conv1D``: y = x @ W + b with W stored (d_in, d_out)."""

    kind = "conv1d_gpt2"

    def lowrank(self, B: Tensor, A: Tensor, scale: float) -> LowRank:
        return LowRank(B, A, scale, self.weight_shape, transpose=True)

    def canonical(self, w: Tensor) -> Tensor:
        return w.t()

    def stored(self, m: Tensor) -> Tensor:
        return m.t()


@dataclass(frozen=True)
class EmbeddingSite(Site):
    """``nn.Embedding``: a lookup is x = one-hot; ``d_in`` = vocabulary, W stored (d_in, d_out)."""

    kind = "embedding"
    takes_dropout = False

    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    sparse: bool = False

    def down(self, x: Tensor, A: Tensor) -> Tensor:
        return F.embedding(
            x, A.t(), self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )  # fmt: skip

    def lowrank(self, B: Tensor, A: Tensor, scale: float) -> LowRank:
        return LowRank(B, A, scale, self.weight_shape, transpose=True)

    canonical = Conv1DSite.canonical
    stored = Conv1DSite.stored


@dataclass(frozen=True)
class ConvSite(Site):
    """``nn.Conv1d/2d/3d`` (groups=1, zero padding): A is a conv with the base's kernel, B a 1×1."""

    kind = "conv"
    channel_dim = 1

    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    @property
    def _conv(self):
        return (F.conv1d, F.conv2d, F.conv3d)[len(self.weight_shape) - 3]

    def down(self, x: Tensor, A: Tensor) -> Tensor:
        a = A.to(x.dtype).reshape(A.shape[0], *self.weight_shape[1:])
        return self._conv(x, a, None, self.stride, self.padding, self.dilation)

    def up_add(self, y: Tensor, h: Tensor, B: Tensor, scale: float) -> Tensor:
        b = B.to(h.dtype).reshape(*B.shape, *([1] * (len(self.weight_shape) - 2)))
        return y.add_(self._conv(h, b).to(y.dtype), alpha=scale)

    def per_out(self, v: Tensor, y: Tensor) -> Tensor:
        return v.to(y.dtype).reshape(-1, *([1] * (y.dim() - 2)))

    def lowrank(self, B: Tensor, A: Tensor, scale: float) -> LowRank:
        ones = [1] * (len(self.weight_shape) - 2)
        return LowRank(
            B.reshape(*B.shape, *ones),
            A.reshape(A.shape[0], *self.weight_shape[1:]),
            scale,
            self.weight_shape,
        )


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    # Checked by name so plain-torch use never imports transformers.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def frozen_linear(base: nn.Module, x: Tensor, *vectors: Tensor, conv1d: bool = False) -> bool:
    """Whether ``base`` is a frozen ``nn.Linear`` (or, with ``conv1d``, GPT-2 ``Conv1D``) whose
    weight has the dtype of ``x`` and ``vectors``: what a method's fused autograd function of
    the layer and its change (IA³, DoRA, OFT) can run in place of the layer."""
    if not (type(base) is nn.Linear or (conv1d and _is_gpt2_conv1d(base))):
        return False
    w, bias = base.weight, base.bias
    frozen = not w.requires_grad and (bias is None or not bias.requires_grad)
    return frozen and all(t.dtype == w.dtype for t in (x, *vectors))


def make_site(name: str, module: nn.Module, layer: int | None, group: str) -> Site | None:
    """The site for a supported layer, or ``None`` if the module type is not adaptable."""
    shape = tuple(module.weight.shape) if hasattr(module, "weight") else ()
    if isinstance(module, nn.Linear):
        return LinearSite(name, layer, group, shape[1], shape[0], shape)
    if _is_gpt2_conv1d(module):
        return Conv1DSite(name, layer, group, shape[0], shape[1], shape)
    if isinstance(module, nn.Embedding):
        return EmbeddingSite(
            name, layer, group, shape[0], shape[1], shape, module.padding_idx,
            module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse,
        )  # fmt: skip
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise SpliceError(
                f"grouped or non-zero-padded conv (groups={module.groups}, "
                f"padding_mode={module.padding_mode!r}) is not supported",
                where=name,
                fix="target a plain convolution",
            )
        d_in = shape[1] * int(torch.Size(shape[2:]).numel())
        return ConvSite(
            name, layer, group, d_in, shape[0], shape,
            module.stride, module.padding, module.dilation,
        )  # fmt: skip
    return None
