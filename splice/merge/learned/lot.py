"""LOT Merging: layer-wise optimal task vectors in closed form (Sun et al., NeurIPS 2025).

merging.md §9 [derived: the official code was not available; closed forms follow from the
paper's objective]. For every layer, the merged task vector minimises the squared feature
drift ``Σ_t ‖X_t(τ − τ_t)ᵀ‖²`` against each expert on its own inputs ``X_t`` (recorded with
forward hooks while expert t runs on task t's examples):

- linear layers (``nn.Linear``, ``nn.Conv2d`` with groups 1 on unfolded patches, GPT-2
  ``Conv1D``): ``τ* = (Σ_t τ_t G_t)(Σ_t G_t)⁺`` with ``G_t = X_tᵀX_t`` in float64; the bias, when
  it has a delta, is solved jointly through inputs augmented with a column of ones;
  ``ridge > 0`` replaces the pseudo-inverse by ``(G + ridge·mean(diag G)·I)⁻¹``;
- normalisation layers (LayerNorm, RMSNorm, BatchNorm with running statistics): per feature
  ``τ*_γ = Σ_t τ_γ,t S_t / Σ_t S_t`` with ``S_t = Σ x̂²`` of the normalised inputs; the shift
  ``τ*_β`` is the mean of ``τ_β,t`` weighted by the number of rows;
- every other tensor (embeddings, unused layers): the mean of the task vectors.

``rows(batch)`` may return a boolean ``(B, L)`` mask of the token rows to count (e.g. the
attention mask, so padding does not enter the statistics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from splice.errors import SpliceError
from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, as_samples, chunks, progress_bar
from splice.merge.learned._functional import (
    Forward,
    Network,
    TaskVectors,
    resolve_device,
    to_cpu,
)

__all__ = ["Params", "lot", "lot_solve"]


class Params(HyperParams):
    num_samples: int = Field(256, ge=1, description="unlabeled examples per task")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")
    ridge: float = Field(0.0, ge=0, description="0: pseudo-inverse; >0: relative ridge term")
    rtol: float = Field(1e-10, ge=0, description="pseudo-inverse cut-off relative to ‖G‖")
    post_scale: float = Field(1.0, description="multiply the merged task vector")


def lot_solve(numerator: Tensor, gram: Tensor, ridge: float = 0.0, rtol: float = 1e-10) -> Tensor:
    """``A·G⁺`` (or ``A(G + ridge·mean(diag G)·I)⁻¹``) for ``A = Σ_t τ_t G_t``, ``G = Σ_t G_t``."""
    if ridge > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        reg = gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * eye
        return torch.linalg.solve(reg, numerator.T).T  # G symmetric
    return numerator @ torch.linalg.pinv(gram, rtol=rtol, hermitian=True)


@dataclass
class _Layer:
    """Running statistics of one solvable layer."""

    kind: str  # "linear" | "norm" | "shift" (only a bias delta: rows are all it needs)
    weight: str | None  # tensor names with deltas (None: unchanged by every task)
    bias: str | None
    inputs: Callable[[Tensor], Tensor] = field(repr=False)  # layer input -> rows (N, n)
    transpose: bool = False  # GPT-2 Conv1D stores (in, out)
    task_stat: Tensor | None = None  # G_t (n, n) or S_t (n,), current task, float64
    task_rows: int = 0
    num: Tensor | None = None  # Σ_t τ_t G_t | Σ_t τ_γ,t S_t
    den: Tensor | None = None  # Σ_t G_t | Σ_t S_t
    bias_num: Tensor | None = None  # norm: Σ_t N_t τ_β,t
    rows: int = 0  # Σ_t N_t

    def observe(self, x: Tensor) -> None:
        r = self.inputs(x.detach()).double()
        self.task_rows += r.shape[0]
        if self.kind == "shift":
            return
        if self.kind == "linear" and self.bias is not None:
            r = torch.cat([r, r.new_ones(r.shape[0], 1)], dim=1)
        stat = r.T @ r if self.kind == "linear" else r.pow(2).sum(0)
        self.task_stat = stat if self.task_stat is None else self.task_stat + stat


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
        return (lambda x: x.reshape(-1, x.shape[-1])), False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return (lambda x: x.reshape(-1, x.shape[-1])), True
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


def _layers(module: nn.Module, names: set[str]) -> dict[str, _Layer]:
    out: dict[str, _Layer] = {}
    for mname, sub in module.named_modules():
        prefix = f"{mname}." if mname else ""
        w = f"{prefix}weight" if f"{prefix}weight" in names else None
        b = f"{prefix}bias" if f"{prefix}bias" in names else None
        if w is None and b is None:
            continue
        lin = _linear_rows(sub)
        if lin is not None:
            out[mname] = _Layer("linear" if w else "shift", w, b, lin[0], transpose=lin[1])
            continue
        norm = _norm_rows(sub)
        if norm is not None:
            out[mname] = _Layer("norm", w, b, norm)
    return out


@contextmanager
def _hooks(
    module: nn.Module, layers: Mapping[str, _Layer], keep: list[Tensor | None]
) -> Iterator[None]:
    def hook(layer: _Layer) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = keep[0]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            layer.observe(x)

        return pre

    handles = [
        module.get_submodule(n).register_forward_pre_hook(hook(lay)) for n, lay in layers.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _close_task(layer: _Layer, tv: TaskVectors, t: int) -> None:
    """Fold task t's statistics into the running sums (τ_t G_t, G_t; τ_γ S_t, S_t; N_t τ_β)."""
    n_rows = layer.task_rows
    if n_rows == 0:
        return
    stat, layer.task_stat, layer.task_rows = layer.task_stat, None, 0
    layer.rows += n_rows
    if layer.kind != "linear" and layer.bias is not None:
        bt = tv.stacked[layer.bias][t].double().reshape(-1) * n_rows
        layer.bias_num = bt if layer.bias_num is None else layer.bias_num + bt
    if stat is None:
        return
    if layer.kind == "linear":
        num = _augmented(layer, tv, t) @ stat
    elif layer.weight is not None:
        num = tv.stacked[layer.weight][t].double().reshape(-1) * stat
    else:
        num = None
    if num is not None:
        layer.num = num if layer.num is None else layer.num + num
    layer.den = stat if layer.den is None else layer.den + stat


def _matrix(layer: _Layer, x: Tensor) -> Tensor:
    x = x.double()
    return x.T if layer.transpose else x.reshape(x.shape[0], -1)


def _augmented(layer: _Layer, tv: TaskVectors, t: int) -> Tensor:
    """``[τ_W, τ_b]`` (or ``τ_W``) of task t as an (out, in[+1]) float64 matrix."""
    assert layer.weight is not None
    w = _matrix(layer, tv.stacked[layer.weight][t])
    if layer.bias is None:
        return w
    return torch.cat([w, tv.stacked[layer.bias][t].double().reshape(-1, 1)], dim=1)


def _solve(layer: _Layer, tv: TaskVectors, ridge: float, rtol: float) -> dict[str, Tensor]:
    """Merged task vectors of the layer's tensors (empty if it saw no inputs)."""
    out: dict[str, Tensor] = {}
    if layer.rows == 0:
        return out
    if layer.kind == "linear":
        assert layer.weight is not None and layer.num is not None and layer.den is not None
        sol = lot_solve(layer.num, layer.den, ridge, rtol)
        w = sol[:, : sol.shape[1] - (layer.bias is not None)]
        out[layer.weight] = (w.T if layer.transpose else w).reshape(tv.base[layer.weight].shape)
        if layer.bias is not None:
            out[layer.bias] = sol[:, -1].reshape(tv.base[layer.bias].shape)
        return out
    if layer.kind == "norm" and layer.weight is not None:
        assert layer.num is not None and layer.den is not None
        mean = tv.stacked[layer.weight].double().mean(0).reshape(-1)
        gamma = torch.where(layer.den > 0, layer.num / layer.den.clamp_min(1e-300), mean)
        out[layer.weight] = gamma.reshape(tv.base[layer.weight].shape)
    if layer.bias is not None and layer.bias_num is not None:
        out[layer.bias] = (layer.bias_num / layer.rows).reshape(tv.base[layer.bias].shape)
    return out


def lot(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    *,
    forward: Forward | None = None,
    rows: Callable[[Any], Tensor] | None = None,
    num_samples: int = 256,
    batch_size: int = 32,
    ridge: float = 0.0,
    rtol: float = 1e-10,
    post_scale: float = 1.0,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Merge by LOT's closed forms from the first ``num_samples`` examples of each task.

    ``data`` is {task: unlabeled inputs}. No labels, heads or gradients are used; statistics
    accumulate in float64. Returns the merged tensors; ``info["solved"]`` counts the tensors
    per rule (``linear``, ``norm``, ``mean``).
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward)
    layers = _layers(module, set(tv.names))
    keep: list[Tensor | None] = [None]
    missing = [t for t in tv.tasks if t not in data]
    if missing:
        raise SpliceError(f"no data for task(s) {missing}", fix="pass data={task: inputs}")
    samples = {t: as_samples(data[t], t) for t in tv.tasks}
    total = sum(min(num_samples, len(s)) for s in samples.values())
    done = 0
    with torch.no_grad(), progress_bar("LOT statistics", total, progress, None) as update:
        for i, task in enumerate(tv.tasks):
            s = samples[task]
            expert = {n: tv.base[n] + tv.stacked[n][i] for n in tv.names}
            with _hooks(module, layers, keep):
                for idx in chunks(min(num_samples, len(s)), batch_size):
                    batch = s.take(idx, dev)[0]
                    keep[0] = rows(batch).bool() if rows is not None else None
                    net.features(expert, batch)
                    done += len(idx)
                    update(done, 0.0)
            for layer in layers.values():
                _close_task(layer, tv, i)
        merged: dict[str, Tensor] = {}
        counts = {"linear": 0, "norm": 0, "shift": 0, "mean": 0}
        for layer in layers.values():
            solved = _solve(layer, tv, ridge, rtol)
            counts[layer.kind] += len(solved)
            merged.update(solved)
        for n in tv.names:
            if n not in merged:
                merged[n] = tv.stacked[n].double().mean(0)
                counts["mean"] += 1
        weights = {n: tv.base[n] + (post_scale * merged[n]).to(tv.base[n].dtype) for n in tv.names}
    info = {
        "tasks": list(tv.tasks),
        "solved": counts,
        "num_samples": num_samples,
        "seconds": time.perf_counter() - start,
    }
    return LearnedMerge(to_cpu(weights, tv.base), None, [], info)


learned.register("lot")(
    LearnedMethod(
        name="lot",
        pretty_name="LOT Merging",
        reference="https://arxiv.org/abs/2505.23859 (merging.md §9)",
        fn=lot,
        Params=Params,
        data="unlabeled",
    )
)
