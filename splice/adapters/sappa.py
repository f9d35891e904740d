"""SAPPA — AutoPEFT's serial + parallel + prefix configuration (Zhou et al., TACL 2024; spec
peft.md §15, modules of §16), as a *composition* of :mod:`.houlsby`, :mod:`.parallel` and
:mod:`.prefix` (their sites, adapters and hooks; no forward re-implemented here).

On every layer that ``layers=`` keeps (AutoPEFT's leave-out bits; None: every layer) it puts
a serial adapter of bottleneck ``serial`` on the FFN output (Houlsby-style, ``sublayer="ffn"``:
one per layer, as the paper's cost formula counts), a parallel adapter of bottleneck
``parallel`` beside the FFN (output scale ``scale``) and a prefix of ``prefix`` keys and values
at self-attention (learned directly, no MLP: the paper's stored ``2·l·d``). A size of 0 leaves
that module out; all three 0 is refused. Where both bottlenecks sit on one FFN, the parallel
adapter adds to the FFN output first and the serial one reads the sum.

Prefixes on a subset of layers [recon]: the backbone's key/value cache holds ``prefix``
positions at every layer (one attention mask for all layers), so a left-out layer gets zero
keys/values that its attention masks out (exact: their softmax weight is 0); real tokens'
positions start at ``prefix`` as in :mod:`.prefix`. The adapters library the paper used pads
the mask per layer instead; the outputs agree.

Trainable parameters per kept layer: ``2·d·s_ser + s_ser + d`` (serial, if s_ser > 0) +
``2·d·s_par + s_par + d`` (parallel) + ``2·l·d`` (prefix): the paper's formula
(:func:`splice.select.autopeft.sappa_share`) plus the bottlenecks' biases. Defaults:
``scale=4`` is the adapters library's ``ParallelConfig`` scaling [recon].
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._attention import InputHook
from .houlsby import HoulsbyConfig, SerialAdapter
from .layer import METHODS, Adapter, Method, MethodConfig
from .parallel import Bottleneck, ParallelAdapter, ParallelConfig, ParallelMethod
from .prefix import PrefixAdapter, PrefixConfig, PrefixTuning, _heads

__all__ = ["SappaConfig", "SerialParallelAdapter"]


class SappaConfig(MethodConfig):
    serial: int = pydantic.Field(0, ge=0, description="serial adapter bottleneck (0: none)")
    parallel: int = pydantic.Field(0, ge=0, description="parallel adapter bottleneck (0: none)")
    prefix: int = pydantic.Field(0, ge=0, description="prefix length per layer (0: none)")
    scale: float = pydantic.Field(4.0, description="the parallel adapter's output scale s")
    activation: Literal["relu", "gelu", "tanh", "identity"] = "relu"
    init: Literal["lora", "bert"] = pydantic.Field("lora", description="lora: Up = 0")

    def parts(self) -> tuple[HoulsbyConfig | None, ParallelConfig | None, PrefixConfig | None]:
        """The three modules' own configs (None where the size is 0)."""
        common = {"activation": self.activation, "init": self.init, "dropout": self.dropout}
        ser = HoulsbyConfig(r=self.serial, sublayer="ffn", **common) if self.serial else None
        par = (ParallelConfig(r=self.parallel, scale=self.scale, sublayer="ffn", **common)
               if self.parallel else None)  # fmt: skip
        pre = PrefixConfig(tokens=self.prefix, reparam=False) if self.prefix else None
        return ser, par, pre


class SerialParallelAdapter(Adapter):
    """Both bottlenecks on one FFN output: ``y ← y + PA(x_in)``, then ``y ← y + SA(y)``."""

    def __init__(self, site: Any, ser: HoulsbyConfig, par: ParallelConfig) -> None:
        super().__init__(site, 1.0)
        self.parallel = ParallelAdapter(site, par)
        self.serial = SerialAdapter(site, ser)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.serial(x, self.parallel(x, y))

    def delta(self):
        return self.parallel.delta()  # raises: nonlinear in the input

    def detach(self) -> None:
        self.parallel.detach()


class _LayerPrefix(PrefixTuning):
    """Prefix tuning on the layers ``layers`` keeps; the others' cache slots are masked."""

    def find(self, model, targets, layers, cfg):
        found = super().find(model, targets, None, cfg)
        keep = None if layers is None else set(layers)
        self.left_out = [(n, m, s) for n, m, s in found if keep is not None and s.layer not in keep]
        kept = [f for f in found if f not in self.left_out]
        if not kept:
            raise SpliceError(f"layers={sorted(keep or [])} leave no attention layer for a prefix")
        return kept

    def attached(self, model: nn.Module, adapters: list[Adapter], cfg: PrefixConfig) -> None:
        by_backbone: dict[str, list[PrefixAdapter]] = defaultdict(list)
        for a in adapters:
            by_backbone[self.groups.get(a.site.name, "")].append(a)
        for name, group in by_backbone.items():
            backbone = model.get_submodule(name)
            hook = InputHook(backbone, cfg.tokens, prefix=_prefix_fn(backbone, group))
            for n, module, site in self.left_out:
                if self.groups.get(n, "") == name:
                    mask = _MaskPrefix(cfg.tokens, site.layer)
                    hook.handles.append(
                        module.register_forward_pre_hook(mask, with_kwargs=True)
                    )  # removed with the prefix hook
            for a in group:
                a.hook = hook

    def num_parameters(self, sites, cfg: PrefixConfig) -> int:
        return sum(2 * cfg.tokens * s.kv_dim for s in sites)


def _prefix_fn(backbone: nn.Module, group: list[PrefixAdapter]):
    """Every layer's cache slot: a kept layer's prefix, zeros (masked) for the others."""
    dtype = next(backbone.parameters()).dtype
    by_layer = {a.site.layer: a for a in group}
    n_layers = int(backbone.config.num_hidden_layers)
    first = group[0]

    def prefix(batch: int) -> list[tuple[Tensor, Tensor]]:
        zero = _heads(torch.zeros_like(first.keys), first.site, batch, dtype)
        out = []
        for i in range(n_layers):
            a = by_layer.get(i)
            kv = (zero, zero) if a is None else [_heads(t, a.site, batch, dtype) for t in a.kv()]
            out.append(tuple(kv))
        return out

    return prefix


class _MaskPrefix:
    """Forward pre-hook of a left-out layer's attention: its first ``n`` key positions (the
    zero prefix slot) get no weight. Handles a boolean, an additive float or no mask."""

    def __init__(self, n: int, layer: int) -> None:
        self.n, self.layer = n, layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) > 1:
            raise SpliceError(f"{type(module).__name__} got its mask by position; not supported")
        mask, n = kwargs.get("attention_mask"), self.n
        if mask is None:
            mask = self._full(module, args[0] if args else kwargs["hidden_states"], kwargs)
        else:
            mask = mask.clone()
            mask[..., :n] = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    def _full(self, module: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        q = hidden.shape[1]
        past = cache.layers[self.layer].get_seq_length() if cache is not None else self.n
        kv = past + q
        i = torch.arange(q, device=hidden.device)[:, None]
        j = torch.arange(kv, device=hidden.device)[None, :]
        allowed = j >= self.n
        if getattr(module, "is_causal", False) and q > 1:
            allowed = allowed & (j <= past + i)
        allowed = allowed[None, None].expand(hidden.shape[0], 1, q, kv)
        impl = module.config._attn_implementation
        if impl == "sdpa":
            return allowed
        if impl == "eager":
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            return torch.where(allowed, zero, torch.finfo(hidden.dtype).min)
        raise SpliceError(f"a prefix on some layers needs sdpa or eager attention, not {impl!r}")


@METHODS.register("sappa")
class Sappa(Method):
    shares_model = False
    pretty_name = "SAPPA (serial + parallel + prefix, AutoPEFT's space)"
    reference_url = "https://arxiv.org/abs/2301.12132"
    family = "hybrid"
    Config = SappaConfig
    kinds = frozenset({"attention"})  # the prefix needs attention; the FFN sites are Linear
    mergeable = False
    lowrank = False
    identity_at_init = False
    selected_by = ("autopeft",)  # `splice search` configures it (its sizes and layers)

    def __init__(self) -> None:
        self.prefix, self.ffn = _LayerPrefix(), ParallelMethod()

    def find(self, model, targets, layers, cfg: SappaConfig):
        ser, par, pre = cfg.parts()
        if not (ser or par or pre):
            raise SpliceError(
                "sappa with serial=parallel=prefix=0 adapts nothing",
                fix="set a size > 0 for at least one module (e.g. serial=16)",
            )
        found = self.prefix.find(model, targets, layers, pre) if pre else []
        if ser or par:
            found += self.ffn.find(model, targets, layers, par or ParallelConfig(sublayer="ffn"))
        return found

    def _split(self, items):
        attn = [i for i in items if getattr(i, "kind", None) == "attention"]
        return attn, [i for i in items if getattr(i, "kind", None) != "attention"]

    def build(self, sites, cfg: SappaConfig) -> list[Adapter]:
        ser, par, pre = cfg.parts()
        attn, ffn = self._split(sites)
        out = self.prefix.build(attn, pre) if pre else []
        for site in ffn:
            if ser and par:
                out.append(SerialParallelAdapter(site, ser, par))
            else:
                out.append(SerialAdapter(site, ser) if ser else ParallelAdapter(site, par))
        return out

    def attached(self, model, adapters, cfg: SappaConfig) -> None:
        _, par, pre = cfg.parts()
        if pre:
            self.prefix.attached(model, [a for a in adapters if isinstance(a, PrefixAdapter)], pre)
        if par:
            inner = [a.parallel if isinstance(a, SerialParallelAdapter) else a for a in adapters]
            self.ffn.attached(model, [a for a in inner if type(a) is ParallelAdapter], par)

    def num_parameters(self, sites, cfg: SappaConfig) -> int:
        ser, par, pre = cfg.parts()
        attn, ffn = self._split(sites)
        total = self.prefix.num_parameters(attn, pre) if pre else 0
        if ser:
            total += sum(Bottleneck.count(s.d_out, s.d_out, ser) for s in ffn)
        if par:
            total += sum(Bottleneck.count(s.d_in, s.d_out, par) for s in ffn)
        return total
