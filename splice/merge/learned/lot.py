"""LOT Merging: layer-wise optimal task vectors in closed form (Sun et al., NeurIPS 2025).

merging.md §9 [derived: the official code was not available; closed forms follow from the
paper's objective]. For every layer, the merged task vector minimises the squared feature
drift ``Σ_t ‖X_t(τ − τ_t)ᵀ‖²`` against each expert on its own inputs ``X_t`` (recorded with
forward hooks while expert t runs on task t's examples):

- linear layers (``nn.Linear``, ``nn.Conv2d`` with groups 1 on unfolded patches, GPT-2
  ``Conv1D``): ``τ* = (Σ_t τ_t G_t)(Σ_t G_t)⁺`` with ``G_t = X_tᵀX_t`` in float64; the bias, when
  it has a delta, is solved jointly through inputs augmented with a column of ones;
  ``ridge > 0`` replaces the pseudo-inverse by ``(G + ridge·mean(diag G)·I)⁻¹``;
- ``nn.MultiheadAttention`` (OpenCLIP's attention; merging.md Errata §9): its q, k and v
  projections — the row blocks of the packed ``in_proj_weight``/``in_proj_bias``, or
  ``q/k/v_proj_weight`` — are linear maps of the query, key and value inputs, and ``out_proj``
  one of the heads' output before it. A pre-hook on the attention module reads the three
  inputs and recomputes that output with ``out_proj`` swapped for the identity (the module's
  forward calls ``F.multi_head_attention_forward``, so ``out_proj``'s own hooks never fire);
  each block is solved by the linear closed form on its own inputs;
- normalisation layers (LayerNorm, RMSNorm, BatchNorm with running statistics): per feature
  ``τ*_γ = Σ_t τ_γ,t S_t / Σ_t S_t`` with ``S_t = Σ x̂²`` of the normalised inputs; the shift
  ``τ*_β`` is the mean of ``τ_β,t`` weighted by the number of rows;
- every other tensor: the mean of the task vectors — embeddings, tokens and other parameters
  that are no weight of such a layer (no closed form), and the tensors of a layer whose
  forward never ran on the examples (e.g. a module used through functional code). None of
  them is silent: ``info["averaged"]`` names each with the reason, ``info["solved"]["mean"]``
  counts them and a ``UserWarning`` says so; ``unsolved="error"`` refuses them instead.

Run the module in eval mode (dropout off): the statistics come from its forward passes.
``rows(batch)`` may return a boolean ``(B, L)`` mask of the token rows to count (e.g. the
attention mask, so padding does not enter the statistics).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, as_samples, progress_bar
from splice.merge.learned._functional import (
    Forward,
    Network,
    TaskVectors,
    resolve_device,
    to_cpu,
)
from splice.merge.learned._lot_layers import Layer, feed, find_layers

__all__ = ["Params", "lot", "lot_solve"]


class Params(HyperParams):
    num_samples: int = Field(256, ge=1, description="unlabeled examples per task")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")
    ridge: float = Field(0.0, ge=0, description="0: pseudo-inverse; >0: relative ridge term")
    rtol: float = Field(1e-10, ge=0, description="pseudo-inverse cut-off relative to ‖G‖")
    post_scale: float = Field(1.0, description="multiply the merged task vector")
    unsolved: Literal["mean", "error"] = Field(
        "mean", description="tensors without a closed form: 'mean' (reported) or 'error'"
    )


def lot_solve(numerator: Tensor, gram: Tensor, ridge: float = 0.0, rtol: float = 1e-10) -> Tensor:
    """``A·G⁺`` (or ``A(G + ridge·mean(diag G)·I)⁻¹``) for ``A = Σ_t τ_t G_t``, ``G = Σ_t G_t``."""
    if ridge > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        reg = gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * eye
        return torch.linalg.solve(reg, numerator.T).T  # G symmetric
    return numerator @ torch.linalg.pinv(gram, rtol=rtol, hermitian=True)


def _bias(layer: Layer, tv: TaskVectors, t: int) -> Tensor:
    """Task t's bias delta (the layer's rows of it) as a float64 vector."""
    assert layer.bias is not None
    b = tv.stacked[layer.bias][t].double().reshape(-1)
    return b if layer.b_rows is None else b[layer.b_rows]


def _close_task(layer: Layer, tv: TaskVectors, t: int) -> None:
    """Fold task t's statistics into the running sums (τ_t G_t, G_t; τ_γ S_t, S_t; N_t τ_β)."""
    n_rows = layer.task_rows
    if n_rows == 0:
        return
    stat, layer.task_stat, layer.task_rows = layer.task_stat, None, 0
    layer.rows += n_rows
    if layer.kind != "linear" and layer.bias is not None:
        bt = _bias(layer, tv, t) * n_rows
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


def _matrix(layer: Layer, x: Tensor) -> Tensor:
    x = x.double()
    x = x.T if layer.transpose else x.reshape(x.shape[0], -1)
    return x if layer.w_rows is None else x[layer.w_rows]


def _augmented(layer: Layer, tv: TaskVectors, t: int) -> Tensor:
    """``[τ_W, τ_b]`` (or ``τ_W``) of task t as an (out, in[+1]) float64 matrix."""
    assert layer.weight is not None
    w = _matrix(layer, tv.stacked[layer.weight][t])
    if layer.bias is None:
        return w
    return torch.cat([w, _bias(layer, tv, t)[:, None]], dim=1)


Piece = tuple[str, slice | None, Tensor]  # tensor name, the output rows solved (None: all), value


def _solve(layer: Layer, tv: TaskVectors, ridge: float, rtol: float) -> list[Piece]:
    """Merged task vectors of the layer's tensors (empty if it saw no inputs)."""
    if layer.rows == 0:
        return []
    out: list[Piece] = []
    if layer.kind == "linear":
        assert layer.weight is not None and layer.num is not None and layer.den is not None
        sol = lot_solve(layer.num, layer.den, ridge, rtol)
        w = sol[:, : sol.shape[1] - (layer.bias is not None)]
        if layer.w_rows is None:
            w = (w.T if layer.transpose else w).reshape(tv.base[layer.weight].shape)
        out.append((layer.weight, layer.w_rows, w))
        if layer.bias is not None:
            out.append((layer.bias, layer.b_rows, sol[:, -1]))
        return out
    if layer.kind == "norm" and layer.weight is not None:
        assert layer.num is not None and layer.den is not None
        mean = tv.stacked[layer.weight].double().mean(0).reshape(-1)
        gamma = torch.where(layer.den > 0, layer.num / layer.den.clamp_min(1e-300), mean)
        out.append((layer.weight, None, gamma.reshape(tv.base[layer.weight].shape)))
    if layer.bias is not None and layer.bias_num is not None:
        out.append((layer.bias, layer.b_rows, layer.bias_num / layer.rows))
    return out


NO_FORM = "no closed form (not a weight of a linear, attention or normalisation layer)"
NEVER_RAN = "its layer's forward never ran on the examples (functional use, or off the path)"


def _assemble(
    tv: TaskVectors, layers: Mapping[str, Layer], ridge: float, rtol: float
) -> tuple[dict[str, Tensor], dict[str, int], dict[str, str]]:
    """Merged task vectors, tensors per rule, and {averaged tensor: why}."""
    pieces: dict[str, list[tuple[slice | None, Tensor]]] = {}
    kinds: dict[str, str] = {}
    for layer in layers.values():
        for name, part, value in _solve(layer, tv, ridge, rtol):
            pieces.setdefault(name, []).append((part, value))
            kinds[name] = layer.kind
    in_layers = {n for layer in layers.values() for n in layer.names()}
    merged: dict[str, Tensor] = {}
    counts = {"linear": 0, "norm": 0, "shift": 0, "mean": 0}
    averaged: dict[str, str] = {}
    for n in tv.names:
        mean = tv.stacked[n].double().mean(0)
        parts = pieces.get(n, [])
        covered = torch.zeros(mean.shape[0] if mean.dim() else 1, dtype=torch.bool)
        value = mean.clone()
        for part, v in parts:
            if part is None:
                value = v.reshape(mean.shape)
                covered[:] = True
            else:
                value[part] = v.reshape(value[part].shape)
                covered[part] = True
        if parts and bool(covered.all()):
            merged[n] = value
            counts[kinds[n]] += 1
        else:
            merged[n] = mean
            counts["mean"] += 1
            averaged[n] = NEVER_RAN if n in in_layers else NO_FORM
    return merged, counts, averaged


def _refuse(averaged: Mapping[str, str]) -> None:
    listed = "; ".join(f"{n} ({why})" for n, why in sorted(averaged.items()))
    raise SpliceError(
        f"{len(averaged)} tensors have no LOT closed form: {listed}",
        fix="leave them out of the deltas, or pass unsolved='mean' to average them "
        "(listed in info['averaged'])",
    )


def _report(averaged: Mapping[str, str]) -> None:
    names = sorted(averaged)
    shown = ", ".join(names[:8]) + (f", … ({len(names) - 8} more)" if len(names) > 8 else "")
    warnings.warn(
        f"LOT: {len(names)} tensors averaged (no closed form, or no inputs seen): {shown}; "
        "reasons in info['averaged']",
        stacklevel=3,
    )


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
    unsolved: Literal["mean", "error"] = "mean",
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Merge by LOT's closed forms from the first ``num_samples`` examples of each task.

    ``data`` is {task: unlabeled inputs}. No labels, heads or gradients are used; statistics
    accumulate in float64. Returns the merged tensors; ``info["solved"]`` counts the tensors
    per rule (``linear``, ``norm``, ``shift``, ``mean``) and ``info["averaged"]`` names each
    averaged tensor with the reason (a ``UserWarning`` lists them too).

    Raises:
        SpliceError: a task without data, or (``unsolved="error"``) a tensor without a closed
            form — checked before any forward pass where the module's layout tells.
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward)
    layers = find_layers(module, set(tv.names))
    missing = [t for t in tv.tasks if t not in data]
    if missing:
        raise SpliceError(f"no data for task(s) {missing}", fix="pass data={task: inputs}")
    in_layers = {n for layer in layers.values() for n in layer.names()}
    if unsolved == "error" and any(n not in in_layers for n in tv.names):
        _refuse({n: NO_FORM for n in tv.names if n not in in_layers})
    samples = {t: as_samples(data[t], t) for t in tv.tasks}
    total = sum(min(num_samples, len(s)) for s in samples.values())
    done = 0
    with torch.no_grad(), progress_bar("LOT statistics", total, progress, None) as update:
        for i, task in enumerate(tv.tasks):
            s = samples[task]
            expert = {n: tv.base[n] + tv.stacked[n][i] for n in tv.names}

            def step(n: int) -> None:
                nonlocal done
                done += n
                update(done, 0.0)

            count = min(num_samples, len(s))
            run = partial(net.features, expert)
            feed(module, layers, run, s, count, batch_size, dev, rows, step)
            for layer in layers.values():
                _close_task(layer, tv, i)
        merged, counts, averaged = _assemble(tv, layers, ridge, rtol)
        if averaged and unsolved == "error":
            _refuse(averaged)
        if averaged:
            _report(averaged)
        weights = {n: tv.base[n] + (post_scale * merged[n]).to(tv.base[n].dtype) for n in tv.names}
    info = {
        "tasks": list(tv.tasks),
        "solved": counts,
        "averaged": averaged,
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
