"""Parallel adapter and scaled parallel adapter (He et al., ICLR 2022) — spec peft.md §16.

A bottleneck ``Δ = s·Up(f(Down(x)))`` computed from a sublayer's *input* ``x`` and added to its
output before the residual add: at the FFN, ``h_out = LN(h_in + FFN(h_in) + Δ)`` for BERT.
``sublayer`` picks where: ``"ffn"`` (default), ``"attn"``, ``"both"`` — located through the
block layouts of :mod:`splice.adapters._attention` (BERT, Llama) near the ``targets`` — or
``"site"``: the matched layers themselves, on any model. Init ``"lora"``: Down Kaiming-uniform,
Up = 0, biases 0 (output = base at step 0); ``"bert"``: N(0, 0.02²) everywhere.
``scaled_parallel`` is the same with ``s = 4`` (the paper's MAM setting); ``learn_scale`` makes
``s`` a trained scalar. Trainable parameters per site: ``r·d_in + r + r·d_out + d_out``
(``2·d·r + r + d`` at d_in = d_out = d), plus 1 with ``learn_scale``.

:class:`Bottleneck` (the Down/f/Up block, with :meth:`Bottleneck.weights` to override, e.g. to
quantise) and :class:`ParallelAdapter` (whose :meth:`ParallelAdapter.make_bottleneck` builds
it) are meant to be built on by other methods (:mod:`.biadaptformer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice._names import layer_index
from splice.deltas import Delta
from splice.errors import SpliceError

from ._attention import InputTap, sublayer_modules
from ._primitives import kaiming_uniform
from ._sites import Site, make_site
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = [
    "Bottleneck",
    "BottleneckConfig",
    "ParallelAdapter",
    "ParallelConfig",
    "sublayer_sites",
]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda h: h}


class BottleneckConfig(MethodConfig):
    r: int = pydantic.Field(16, gt=0, description="bottleneck width")
    scale: float = pydantic.Field(1.0, description="output scale s")
    learn_scale: bool = pydantic.Field(False, description="train s as a scalar")
    activation: Literal["relu", "gelu", "tanh", "identity"] = "relu"
    init: Literal["lora", "bert"] = pydantic.Field("lora", description="lora: Up = 0")
    sublayer: Literal["ffn", "attn", "both", "site"] = pydantic.Field(
        "ffn", description="where: a block's FFN/attention sublayer, or the matched layers"
    )


class ParallelConfig(BottleneckConfig):
    pass


class Bottleneck(nn.Module):
    """``x ↦ s·Up(Dropout(f(Down(x))))``; ``down`` (r, d_in), ``up`` (d_out, r), with biases
    unless ``bias=False``; ``dropout`` acts on the hidden code (0: none)."""

    def __init__(
        self, d_in: int, d_out: int, cfg: BottleneckConfig, bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        r = cfg.r
        self.down = nn.Parameter(torch.empty(r, d_in))
        self.down_bias = nn.Parameter(torch.zeros(r)) if bias else None
        self.up = nn.Parameter(torch.zeros(d_out, r))
        self.up_bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.hidden_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if cfg.init == "lora":
            kaiming_uniform(self.down)
        else:
            with torch.no_grad():
                for p in self.parameters():
                    p.normal_(0.0, 0.02)
        if cfg.learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(cfg.scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(cfg.scale)), persistent=False)
        self.act = ACTIVATIONS[cfg.activation]

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(down, up)`` as used in the forward; override to transform them (quantise)."""
        return self.down, self.up

    def forward(self, x: Tensor) -> Tensor:
        down, up = self.weights()
        h = self.act(F.linear(x, down.to(x.dtype), _cast(self.down_bias, x)))
        h = self.hidden_dropout(h)
        return F.linear(h, up.to(x.dtype), _cast(self.up_bias, x)) * self.scale.to(x.dtype)

    @staticmethod
    def count(d_in: int, d_out: int, cfg: BottleneckConfig) -> int:
        return cfg.r * d_in + cfg.r + cfg.r * d_out + d_out + int(cfg.learn_scale)


def _cast(bias: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bias is None else bias.to(x.dtype)


class ParallelAdapter(Adapter):
    """``y + Bottleneck(x_in)``: ``x_in`` is the layer's own input, or the input of the
    sublayer's first module when a tap is set (:meth:`ParallelMethod.attached`)."""

    reads = "input"  # or "output": a serial adapter

    def __init__(self, site: Site, cfg: BottleneckConfig) -> None:
        super().__init__(site, 1.0, cfg.dropout)
        d_in = site.d_in if self.reads == "input" else site.d_out
        self.bottleneck = self.make_bottleneck(d_in, site.d_out, cfg)
        self.tap: InputTap | None = None

    def make_bottleneck(self, d_in: int, d_out: int, cfg: BottleneckConfig) -> Bottleneck:
        """The Down/f/Up block; a subclass returns its own (Bi-AdaptFormer: 1-bit matrices)."""
        return Bottleneck(d_in, d_out, cfg)

    def source(self, x: Tensor, y: Tensor) -> Tensor:
        if self.reads == "output":
            return y
        return x if self.tap is None else self.tap.take(self.site.name)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.bottleneck(self.dropout(self.source(x, y))).to(y.dtype)

    def delta(self) -> Delta:
        raise SpliceError(
            f"{type(self).__name__} applies a nonlinear function of the input, so it has no "
            "single ΔW to merge",
            where=self.site.name,
            fix="keep it unmerged (remove_adapters(model, merge=False) drops it)",
        )

    def detach(self) -> None:
        if self.tap is not None:
            self.tap.handle.remove()
            self.tap = None


def sublayer_sites(
    model: nn.Module, targets, layers, sublayer: str, side: str = "in"
) -> tuple[list[tuple[str, nn.Module, Site]], dict[str, str]]:
    """The out modules of ``sublayer`` near ``targets`` (wrapped) and each one's in module.

    ``sublayer="site"``: the matched layers, no in module. ``side="in"``: the adapter reads
    the sublayer's input (the site's d_in is the in module's); ``"out"``: its output.
    """
    from .inject import find_sites

    if sublayer == "site":
        return find_sites(model, targets, layers), {}
    matched = [name for name, _, _ in _matched(model, targets)]
    pairs = []
    for which in ("attn", "ffn") if sublayer == "both" else (sublayer,):
        pairs += sublayer_modules(model, matched, which)
    keep = None if layers is None else set(layers)
    found, sources = [], {}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for src, dst in sorted(set(pairs), key=lambda p: order[p[1]]):
        if keep is not None and layer_index(dst) not in keep:
            continue
        module = model.get_submodule(dst)
        base = getattr(module, "base_layer", module)  # already adapted by a named adapter
        site = make_site(dst, base, layer_index(dst), dst.rsplit(".", 1)[-1])
        source = make_site(src, model.get_submodule(src), None, "")
        if site is None or site.kind != "linear" or source is None:
            raise SpliceError(f"{type(module).__name__} is not a Linear sublayer output", where=dst)
        if side == "in":  # the adapter reads the sublayer input: its width is d_in
            site = dataclasses.replace(site, d_in=source.d_in)
        found.append((dst, module, site))
        sources[dst] = src
    if not found:
        raise SpliceError(f"layers={sorted(keep or [])} leaves no sublayer to adapt")
    return found, sources


def _matched(model: nn.Module, targets):
    from .inject import _matcher

    match = _matcher(targets)
    hits = [(n, m, None) for n, m in model.named_modules() if n and match(n)]
    if not hits:
        raise SpliceError(f"targets {targets!r} match no module of {type(model).__name__}")
    return hits


class _BottleneckMethod(Method):
    """Shared by the parallel and serial adapters: sublayer sites, taps, the count."""

    family = "additive"
    kinds = frozenset({"linear"})
    mergeable = False
    lowrank = False
    adapter_class: type[Adapter] = ParallelAdapter
    tap = True  # read the sublayer input at its in module

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}

    def sharing_refused(self, cfg: Any) -> str | None:
        if self.tap and cfg.sublayer != "site":
            return (
                f"{self.pretty_name} reads its sublayer's input through a hook, which a mixed "
                "batch does not route, so it cannot share a model with other named adapters "
                "(sublayer='site' can)"
            )
        return None

    def find(self, model, targets, layers, cfg):
        side = "in" if self.tap else "out"
        found, self.sources = sublayer_sites(model, targets, layers, cfg.sublayer, side)
        return found

    def build(self, sites: list[Site], cfg: BottleneckConfig) -> list[Adapter]:
        return [self.adapter_class(site, cfg) for site in sites]

    def attached(self, model: nn.Module, adapters: list[Adapter], cfg) -> None:
        if not self.tap:
            return
        for adapter in adapters:
            src = self.sources.get(adapter.site.name)
            if src is not None:
                adapter.tap = InputTap(model.get_submodule(_unwrapped(model, src)))

    def num_parameters(self, sites: list[Site], cfg: BottleneckConfig) -> int:
        return sum(Bottleneck.count(s.d_in, s.d_out, cfg) for s in sites)


def _unwrapped(model: nn.Module, name: str) -> str:
    """``name``, or its path inside an adapted layer that wraps it (``….base_layer``)."""
    from .layer import AdaptedLayer

    module = model.get_submodule(name)
    return f"{name}.base_layer" if isinstance(module, AdaptedLayer) else name


@METHODS.register("parallel")
class ParallelMethod(_BottleneckMethod):
    pretty_name = "Parallel adapter"
    reference_url = "https://arxiv.org/abs/2110.04366"
    Config = ParallelConfig
