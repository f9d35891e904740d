"""A quantized layer: per-output-channel fake-quant weights and a per-tensor fake-quant input
(spec other.md §4.2), around any ``Linear``, ``Conv1d``/``Conv2d`` or ``Embedding``.

The wrapped module keeps its own ``forward`` (padding subclasses, HF layers): the quantized
weight is passed in with :func:`torch.func.functional_call`. After :meth:`QuantLayer.freeze`
the layer holds integer codes, steps and zero points as buffers and computes
``Δ·(q − z)``, bit for bit the fake-quant weight it was frozen from.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from splice.compress.quantizer import FakeQuant, codes, fake_quant, grid, saved_as_codes
from splice.errors import SpliceError

__all__ = [
    "QUANTIZABLE",
    "QuantLayer",
    "check_bits",
    "quant_layers",
    "quantizable",
    "set_module",
    "wrap",
]

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def check_bits(bits: int, what: str = "bits") -> int:
    """``bits`` if it is an integer in 2–8, else a :class:`SpliceError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SpliceError(f"{what} {bits!r} is not supported", fix="use an integer from 2 to 8")
    return bits


def _channel_shape(weight: Tensor) -> tuple[int, ...]:
    return (weight.shape[0],) + (1,) * (weight.ndim - 1)


class QuantLayer(nn.Module):
    """``base`` with its weight quantized to ``w_bits`` per output channel (rows of an
    embedding) and, unless ``a_bits`` is None or the input is integer, its input to
    ``a_bits`` per tensor."""

    def __init__(self, base: nn.Module, w_bits: int, a_bits: int | None = 8) -> None:
        super().__init__()
        if isinstance(base, nn.Embedding):
            a_bits = None
        self.base = base
        self.wq = FakeQuant(check_bits(w_bits), _channel_shape(base.weight))
        self.aq = None if a_bits is None else FakeQuant(check_bits(a_bits, "activation bits"))
        self.wq.init_minmax(*_channel_minmax(base.weight.detach()))
        self.frozen = False

    @property
    def w_bits(self) -> int:
        return self.wq.bits

    @property
    def a_bits(self) -> int | None:
        return None if self.aq is None else self.aq.bits

    def quant_weight(self) -> Tensor:
        """The weight the layer computes with."""
        if self.frozen:
            return self.weight_scale * (self.qweight.to(self.weight_scale.dtype) - self.weight_zero)
        return self.wq(self.base.weight)

    def quant_input(self, x: Tensor) -> Tensor:
        if self.aq is None or not x.is_floating_point():
            return x
        if self.frozen:
            q = codes(x, self.input_scale, self.input_zero, self.aq.bits)
            return self.input_scale * (q - self.input_zero)
        return self.aq(x)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.base
        if isinstance(base, nn.Embedding) and not self.frozen and base.max_norm is None:
            return self._lookup(x)
        if self.frozen or not torch.is_grad_enabled() or base.weight.requires_grad:
            x = self.quant_input(x)
            return functional_call(base, {"weight": self.quant_weight()}, (x, *args), kwargs)
        # a graph through the whole network (bias tuning; AdaQuant's is one layer's on a
        # small draw): the saved fake-quant weight and input are kept as their codes
        coded = [self.wq.coded(base.weight)]
        if self.aq is not None and x.is_floating_point():
            coded.append(self.aq.coded(x))
            x = coded[-1][0]
        with saved_as_codes(*coded):
            return functional_call(base, {"weight": coded[0][0]}, (x, *args), kwargs)

    def _lookup(self, ids: Tensor) -> Tensor:
        """``Q(W)[ids]`` computed as ``Q(W[ids])`` (rows are quantized independently): an
        embedding's rows quantized only where looked up, same values and gradients."""
        base = self.base

        def gather(table: Tensor) -> Tensor:
            return nn.functional.embedding(
                ids, table.reshape(base.num_embeddings, -1), base.padding_idx,
                scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
            )  # fmt: skip

        return fake_quant(
            gather(base.weight), gather(self.wq.range), gather(self.wq.low), self.w_bits
        )

    def state(self) -> dict[str, Tensor | int]:
        """A copy of the weights, bias, quantizer parameters and bits (one variant)."""
        out: dict[str, Tensor | int] = {k: p.detach().clone() for k, p in self.named_parameters()}
        out["bits"] = self.w_bits
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, Tensor | int]) -> None:
        """Switch to a variant from :meth:`state`."""
        for k, p in self.named_parameters():
            p.copy_(state[k])
        self.wq.bits = int(state["bits"])

    @torch.no_grad()
    def set_bits(self, w_bits: int) -> None:
        """Requantize to ``w_bits`` from the current weight's min/max."""
        self.wq.bits = check_bits(w_bits)
        self.wq.init_minmax(*_channel_minmax(self.base.weight))

    @torch.no_grad()
    def freeze(self) -> None:
        """Store integer codes, per-channel steps and zero points; drop the float weight."""
        q, delta, zero = self.wq.encode(self.base.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale", delta.detach().clone())
        self.register_buffer("weight_zero", zero.detach().clone())
        if self.aq is not None:
            delta_x, zero_x = grid(self.aq.range, self.aq.low, self.aq.bits)
            self.register_buffer("input_scale", delta_x.detach().clone())
            self.register_buffer("input_zero", zero_x.detach().clone())
        self.frozen = True
        del self.base.weight
        self.base.weight = None


def _channel_minmax(weight: Tensor) -> tuple[Tensor, Tensor]:
    flat = weight.reshape(weight.shape[0], -1)
    return flat.min(1).values, flat.max(1).values


def quantizable(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the layers :class:`QuantLayer` can wrap (``exclude``: names or suffixes)."""
    names, seen = [], set()
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, QUANTIZABLE) or weight is None or id(weight) in seen:
            continue  # a tied weight (an LM head sharing the embedding) is quantized once
        seen.add(id(weight))
        if not any(name == e or name.endswith("." + e) for e in exclude):
            names.append(name)
    return names


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def wrap(model: nn.Module, name: str, w_bits: int, a_bits: int | None = 8) -> QuantLayer:
    """Replace layer ``name`` by a :class:`QuantLayer` around it (returned)."""
    layer = QuantLayer(model.get_submodule(name), w_bits, a_bits)
    set_module(model, name, layer)
    return layer


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """The quantized layers of ``model``, by the name of the layer they replaced."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            yield name, mod
