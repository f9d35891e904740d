"""LOT's solvable layers and the forward hooks that collect their input statistics.

A :class:`Layer` is one linear map (``nn.Linear``, ``nn.Conv2d`` on unfolded patches, GPT-2
``Conv1D``, one q/k/v block or the ``out_proj`` of an ``nn.MultiheadAttention``) or one
normalisation layer whose tensors some task changes; :func:`collect` hooks them so that every
forward pass of the module adds the rows it sees to the current task's statistics
(merging.md §9; splice/merge/learned/lot.py solves them).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

__all__ = ["Layer", "collect", "find_layers"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


Memo = dict[tuple[int, bool], tuple[Tensor, Tensor, int]]
"""One batch's Grams by (id of the input tensor, bias column): see :meth:`Layer.observe`."""


@dataclass
class Layer:
    """Running statistics of one solvable layer (or one q/k/v block of an attention)."""

    kind: str  # "linear" | "norm" | "shift" (only a bias delta: rows are all it needs)
    weight: str | None  # tensor names with deltas (None: unchanged by every task)
    bias: str | None
    module: str  # the module whose forward pre-hook feeds it
    inputs: Callable[[Tensor], Tensor] = field(default=_flat, repr=False)  # input -> rows (N, n)
    source: str = "input"  # the module's input, or an attention's "query"|"key"|"value"|"attn"
    transpose: bool = False  # GPT-2 Conv1D stores (in, out)
    w_rows: slice | None = None  # the output rows of ``weight`` it owns (packed in_proj)
    b_rows: slice | None = None  # the same for ``bias``
    task_stat: Tensor | None = None  # G_t (n, n) or S_t (n,), current task, float64
    task_rows: int = 0
    num: Tensor | None = None  # Σ_t τ_t G_t | Σ_t τ_γ,t S_t
    den: Tensor | None = None  # Σ_t G_t | Σ_t S_t
    bias_num: Tensor | None = None  # norm/shift: Σ_t N_t τ_β,t
    rows: int = 0  # Σ_t N_t

    def observe(self, x: Tensor, memo: Memo | None = None, raw: Tensor | None = None) -> None:
        """Add the rows of ``x`` to the task's statistics. With ``memo`` (one batch's), a
        linear layer reuses the Gram another one computed from the same input tensor ``raw``
        (before row masking), e.g. the q/k/v projections of one transformer layer."""
        linear = raw is not None and self.kind == "linear" and self.inputs is _flat
        share = memo if linear else None
        key = (id(raw), self.bias is not None)
        if share is not None and key in share:
            _, stat, rows = share[key]
            stat = stat.clone()
        else:
            r = self.inputs(x.detach()).double()
            rows, stat = r.shape[0], None
            if self.kind == "linear" and self.bias is not None:
                r = torch.cat([r, r.new_ones(r.shape[0], 1)], dim=1)
            if self.kind != "shift":
                stat = r.T @ r if self.kind == "linear" else r.pow(2).sum(0)
            if share is not None:  # a linear layer: raw is set and stat computed
                share[key] = (raw, stat, rows)  # raw kept alive: its id is not reused
        self.task_rows += rows
        if stat is not None:
            self.task_stat = stat if self.task_stat is None else self.task_stat + stat

    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


def _norm_rows(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    if isinstance(module, nn.LayerNorm):
        k, eps = len(module.normalized_shape), module.eps
        n = math.prod(module.normalized_shape)
        dims = tuple(range(-k, 0))

        def layer_norm(x: Tensor) -> Tensor:
            x = x.double()
            var = x.var(dims, unbiased=False, keepdim=True)
            return ((x - x.mean(dims, keepdim=True)) / (var + eps).sqrt()).reshape(-1, n)

        return layer_norm
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            return None
        mean, var, eps = module.running_mean, module.running_var, module.eps

        def batch_norm(x: Tensor) -> Tensor:
            x = x.double().movedim(1, -1)
            return ((x - mean.double()) / (var.double() + eps).sqrt()).reshape(-1, x.shape[-1])

        return batch_norm
    if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
        n = module.weight.numel()

        def rms_norm(x: Tensor) -> Tensor:
            x = x.double().reshape(-1, n)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

        return rms_norm
    return None


def _linear_rows(module: nn.Module) -> tuple[Callable[[Tensor], Tensor], bool] | None:
    if isinstance(module, nn.Linear):
        return _flat, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return _flat, True
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        if isinstance(module.padding, str):
            return None
        kw = {"kernel_size": module.kernel_size, "dilation": module.dilation,
              "padding": module.padding, "stride": module.stride}  # fmt: skip

        def patches(x: Tensor) -> Tensor:
            p = F.unfold(x, **kw)  # (B, C·kh·kw, L)
            return p.transpose(1, 2).reshape(-1, p.shape[1])

        return patches, False
    return None


def _attention(mname: str, mha: nn.MultiheadAttention, names: set[str]) -> dict[str, Layer]:
    """The q, k, v blocks of an attention's in-projection and its ``out_proj``, all fed by a
    pre-hook on the attention module itself."""
    p = f"{mname}." if mname else ""
    e = mha.embed_dim
    bias = f"{p}in_proj_bias" if f"{p}in_proj_bias" in names else None
    out: dict[str, Layer] = {}
    for i, src in enumerate(("query", "key", "value")):
        part = slice(i * e, (i + 1) * e)
        packed = mha._qkv_same_embed_dim
        w = f"{p}in_proj_weight" if packed else f"{p}{src[0]}_proj_weight"
        w = w if w in names else None
        if w is not None or bias is not None:
            kind = "linear" if w else "shift"
            w_rows = part if packed and w else None
            layer = Layer(kind, w, bias, mname, source=src, w_rows=w_rows, b_rows=part)
            out[f"{mname}:{src}"] = layer
    w, b = (f"{p}out_proj.{k}" for k in ("weight", "bias"))
    w, b = (n if n in names else None for n in (w, b))
    if w is not None or b is not None:
        out[f"{mname}:attn"] = Layer("linear" if w else "shift", w, b, mname, source="attn")
    return out


def find_layers(module: nn.Module, names: set[str]) -> dict[str, Layer]:
    out: dict[str, Layer] = {}
    inside: set[str] = set()  # an attention's out_proj: fed by the attention's hook
    for mname, sub in module.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(sub, nn.MultiheadAttention):
            out.update(_attention(mname, sub, names))
            inside.add(f"{prefix}out_proj")
            continue
        w = f"{prefix}weight" if f"{prefix}weight" in names else None
        b = f"{prefix}bias" if f"{prefix}bias" in names else None
        if (w is None and b is None) or mname in inside:
            continue
        lin = _linear_rows(sub)
        if lin is not None:
            kind = "linear" if w else "shift"
            out[mname] = Layer(kind, w, b, mname, lin[0], transpose=lin[1])
            continue
        norm = _norm_rows(sub)
        if norm is not None:
            out[mname] = Layer("norm", w, b, mname, norm)
    return out


def _attention_inputs(
    mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], busy: list[bool], heads: bool
) -> dict[str, Tensor]:
    """Query, key and value (batch first) and, if ``heads``, the output before ``out_proj``:
    the attention rerun with ``out_proj`` swapped for the identity."""
    bound = inspect.signature(mod.forward).bind(*args, **kwargs)
    a = bound.arguments

    def batch_first(x: Tensor) -> Tensor:
        return x.transpose(0, 1) if x.dim() == 3 and not getattr(mod, "batch_first", False) else x

    out = {s: batch_first(a[s]) for s in ("query", "key", "value")}
    if heads:
        w, b = mod.out_proj.weight, mod.out_proj.bias
        swap = {"out_proj.weight": torch.eye(w.shape[0], dtype=w.dtype, device=w.device)}
        if b is not None:
            swap["out_proj.bias"] = torch.zeros_like(b)
        a["need_weights"] = False
        busy[0] = True  # the rerun must not feed the statistics again
        try:
            out["attn"] = batch_first(functional_call(mod, swap, bound.args, bound.kwargs)[0])
        finally:
            busy[0] = False
    return out


@contextmanager
def collect(
    module: nn.Module,
    layers: Mapping[str, Layer],
    keep: list[Tensor | None],
    memo: Memo | None = None,
) -> Iterator[None]:
    groups: dict[str, list[Layer]] = {}
    for lay in layers.values():
        groups.setdefault(lay.module, []).append(lay)
    busy = [False]

    def hook(group: list[Layer]) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if busy[0]:
                return
            if isinstance(mod, nn.MultiheadAttention):
                heads = any(lay.source == "attn" for lay in group)
                sources = _attention_inputs(mod, args, kwargs, busy, heads)
            else:
                sources = {"input": args[0] if args else next(iter(kwargs.values()))}
            mask = keep[0]
            for lay in group:
                x = raw = sources[lay.source]
                if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                    x = x[mask]
                lay.observe(x, memo, raw)

        return pre

    handles = [
        module.get_submodule(n).register_forward_pre_hook(hook(g), with_kwargs=True)
        for n, g in groups.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def feed(
    module: nn.Module,
    layers: Mapping[str, Layer],
    run: Callable[[Any], Any],
    samples: Any,
    count: int,
    batch_size: int,
    device: torch.device,
    rows: Callable[[Any], Tensor] | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> None:
    """One streaming pass: ``run(batch)`` over the first ``count`` examples of ``samples``
    (a :class:`~splice.merge.learned._data.Samples`) in batches, with every layer's hook on;
    ``rows(batch)`` picks the token rows counted; ``on_batch(n)`` after each batch of n.
    Linear layers that read the same input tensor share its Gram within a batch."""
    keep: list[Tensor | None] = [None]
    memo: Memo = {}
    with collect(module, layers, keep, memo):
        for start in range(0, count, batch_size):
            idx = torch.arange(start, min(start + batch_size, count)).numpy()
            batch = samples.take(idx, device)[0]
            keep[0] = rows(batch).bool() if rows is not None else None
            run(batch)
            memo.clear()
            on_batch(len(idx))
