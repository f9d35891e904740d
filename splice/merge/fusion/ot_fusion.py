"""Transformer fusion with optimal transport (Imfeld et al., ICLR 2024; merging.md §13).

Fuses two or more models of the same family that need *not* share an initialisation: every
model is aligned to an anchor layer by layer with a transport map between their neurons, and
the aligned weights are averaged. No task vectors, no base model.

A model is read as a sequence of operations found by walking its modules in registration
order (the order of its forward, as in ``nn.Sequential`` stacks and ViT-style models):

- ``nn.Linear``: inputs aligned with the incoming map (``W·T_in``); a map ``T`` from the cost
  between the model's and the anchor's neurons; outputs aligned (``barycentric(T)ᵀ·W``, bias
  likewise); ``T`` becomes the incoming map. The *last* linear layer is the classifier: inputs
  aligned only (§13.3 item 7);
- ``nn.LayerNorm``: ``γ``, ``β`` aligned with the incoming map, which passes unchanged;
- ``nn.TransformerEncoderLayer`` with ``norm_first=True`` (pre-LN): norm1 → self-attention →
  residual, norm2 → linear1 → linear2 → residual. The packed q, k and v blocks are fused as
  linear layers from the residual-stream map, each with its own map (``separate``, the
  paper's default); ``out_proj``'s inputs are aligned with v's map and its map is the branch
  map. After each residual the stream map is ``combine(T_res, T_branch, residual)``
  (``mean`` by default, §13.4 item 3);
- parameters owned directly by a container (a class token, positional embeddings) are
  residual-stream vectors: aligned along their last dimension with the map of the first
  linear layer (the patch or token embedding), as §13.4 item 5 does in weight space;
- parameter-free modules (activations, dropout, flatten) pass the map on. Any other module
  with parameters is refused.

Costs (§13.3 item 2): ``activations`` — Euclidean distance between neurons' activation
vectors over ``num_samples`` inputs (standardised per neuron), max-normalised; ``weights`` —
distance between unit-normed rows of the input-aligned weights. Maps from exact EMD
(``solver="emd"``) or Sinkhorn with ``reg`` (POT). The fused model has the anchor's widths
(heterogeneous widths give rectangular maps) and is the equal-weight mean of every model
aligned to the anchor (pass ``weights`` for others). Models of different depth or layout
are refused in one line. Dropout is irrelevant: activations are recorded in eval mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.merge.fusion._ot import Residual, Solver, barycentric, combine, cost_matrix, solve

__all__ = ["OTFusion", "Op", "layout", "ot_fuse"]

Cost = Literal["activations", "weights"]


@dataclass(frozen=True)
class Op:
    """One step of a model's layout: ``kind`` and the module it reads."""

    kind: str  # linear | head | norm | attn | begin | end
    module: str


_FREE = (nn.Dropout, nn.Identity, nn.Flatten, nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid)


def _walk(mod: nn.Module, prefix: str, ops: list[Op], stream: list[str]) -> None:
    for name, _ in mod.named_parameters(recurse=False):
        stream.append(f"{prefix}{name}")
    for name, child in mod.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Linear):
            ops.append(Op("linear", path))
        elif isinstance(child, nn.LayerNorm):
            ops.append(Op("norm", path))
        elif isinstance(child, nn.TransformerEncoderLayer):
            if not child.norm_first:
                raise SpliceError("OT fusion supports pre-LN encoder layers only", where=path,
                                  fix="build the layer with norm_first=True")  # fmt: skip
            ops += [Op("begin", path), Op("norm", f"{path}.norm1"), Op("attn", f"{path}.self_attn")]
            ops += [Op("end", path), Op("begin", path), Op("norm", f"{path}.norm2")]
            ops += [Op("linear", f"{path}.linear1"), Op("linear", f"{path}.linear2")]
            ops.append(Op("end", path))
        elif isinstance(child, _FREE) or not any(True for _ in child.parameters()):
            continue
        elif isinstance(child, nn.MultiheadAttention) or not any(True for _ in child.children()):
            raise SpliceError(
                f"OT fusion does not support a {type(child).__name__} module", where=path,
                fix="supported: Linear, LayerNorm, pre-LN TransformerEncoderLayer, containers",
            )  # fmt: skip
        else:
            _walk(child, f"{path}.", ops, stream)


def layout(model: nn.Module) -> tuple[list[Op], list[str]]:
    """The model's operations and its residual-stream parameters (see the module docstring).

    Raises:
        SpliceError: a module OT fusion cannot align, or no linear layer at all.
    """
    ops: list[Op] = []
    stream: list[str] = []
    _walk(model, "", ops, stream)
    linear = [i for i, op in enumerate(ops) if op.kind == "linear"]
    if not linear:
        raise SpliceError("OT fusion: the model has no linear layer to align")
    ops[linear[-1]] = Op("head", ops[linear[-1]].module)
    return ops, stream


@dataclass
class OTFusion:
    """The fused model (a copy of the anchor with fused tensors) and what the fusion did."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def _record(
    model: nn.Module, ops: Sequence[Op], data: Tensor, batch_size: int, forward: Callable
) -> dict[str, Tensor]:
    """Activations ``(rows, width)`` of every linear layer and q/k/v/out of every attention."""
    acts: dict[str, list[Tensor]] = {}
    handles = []

    def keep(key: str, x: Tensor) -> None:
        acts.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).double())

    for op in ops:
        mod = model.get_submodule(op.module)
        if op.kind in ("linear", "head"):
            handles.append(mod.register_forward_hook(lambda m, a, o, k=op.module: keep(k, o)))
        elif op.kind == "attn":

            def pre(m: nn.MultiheadAttention, args: tuple, kw: dict, k: str = op.module) -> None:
                x = args[0] if args else kw["query"]
                for i, part in enumerate(_qkv_rows(m)):
                    b = None if m.in_proj_bias is None else m.in_proj_bias[part]
                    keep(f"{k}:{'qkv'[i]}", nn.functional.linear(x, m.in_proj_weight[part], b))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(lambda m, a, o, k=op.module: keep(k, o[0])))
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():  # keeps nn.TransformerEncoderLayer off its fused fast path
            for start in range(0, data.shape[0], batch_size):
                forward(model, data[start : start + batch_size])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}


def _qkv_rows(mha: nn.MultiheadAttention) -> list[slice]:
    if not mha._qkv_same_embed_dim:
        raise SpliceError("OT fusion: attention with separate q/k/v projections")
    e = mha.embed_dim
    return [slice(i * e, (i + 1) * e) for i in range(3)]


class _Aligner:
    """Aligns one model to the anchor, op by op (merging.md §13.3–13.4)."""

    def __init__(self, cost: Cost, solver: Solver, reg: float, residual: Residual) -> None:
        self.cost, self.solver, self.reg, self.residual = cost, solver, reg, residual

    def map(self, w0: Tensor, w1: Tensor, a0: Tensor | None, a1: Tensor | None) -> Tensor:
        if self.cost == "activations":
            assert a0 is not None and a1 is not None
            c = cost_matrix(a0.T, a1.T, standardize=True)
        else:
            c = cost_matrix(w0, w1, standardize=False)
        return solve(c, self.solver, self.reg)

    def linear(self, w0: Tensor, w1: Tensor, t_in: Tensor | None, a0, a1) -> tuple[Tensor, Tensor]:
        """(input-aligned weight of model 0, its map to the anchor's outputs)."""
        w = w0.double() if t_in is None else w0.double() @ t_in
        return w, self.map(w, w1.double(), a0, a1)


def _align(
    model: nn.Module,
    anchor: nn.Module,
    ops: Sequence[Op],
    stream: Sequence[str],
    acts: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None,
    al: _Aligner,
) -> dict[str, Tensor]:
    p0 = {n: p.detach() for n, p in model.named_parameters()}
    p1 = {n: p.detach() for n, p in anchor.named_parameters()}
    out: dict[str, Tensor] = {}
    t: Tensor | None = None  # the incoming map
    saved: list[Tensor | None] = []
    first = True

    def act(key: str) -> tuple[Tensor | None, Tensor | None]:
        return (acts[0][key], acts[1][key]) if acts is not None else (None, None)

    def out_rows(name: str, w: Tensor, tmap: Tensor) -> None:
        out[name] = barycentric(tmap).T @ w

    for op in ops:
        m = f"{op.module}."
        if op.kind in ("linear", "head"):
            w, b = p0[f"{m}weight"], p0.get(f"{m}bias")
            if op.kind == "head":
                out[f"{m}weight"] = w.double() if t is None else w.double() @ t
                if b is not None:
                    out[f"{m}bias"] = b.double()
                continue
            wa, tmap = al.linear(w, p1[f"{m}weight"], t, *act(op.module))
            out_rows(f"{m}weight", wa, tmap)
            if b is not None:
                out_rows(f"{m}bias", b.double(), tmap)
            t = tmap
            if first:
                for name in stream:
                    out[name] = p0[name].double() @ barycentric(t)
                first = False
        elif op.kind == "norm":
            for k in ("weight", "bias"):
                if f"{m}{k}" in p0:
                    v = p0[f"{m}{k}"].double()
                    out[f"{m}{k}"] = v if t is None else v @ barycentric(t)
        elif op.kind == "begin":
            saved.append(t)
        elif op.kind == "end":
            assert t is not None
            t = combine(saved.pop(), t, al.residual)
        else:  # attention
            mha0 = model.get_submodule(op.module)
            w_in, b_in = p0[f"{m}in_proj_weight"], p0.get(f"{m}in_proj_bias")
            w_in1 = p1[f"{m}in_proj_weight"]
            rows0, rows1 = _qkv_rows(mha0), _qkv_rows(anchor.get_submodule(op.module))
            ws, bs, maps = [], [], []
            for i in range(3):
                a0, a1 = act(f"{op.module}:{'qkv'[i]}")
                wa, tmap = al.linear(w_in[rows0[i]], w_in1[rows1[i]], t, a0, a1)
                ws.append(barycentric(tmap).T @ wa)
                if b_in is not None:
                    bs.append(barycentric(tmap).T @ b_in[rows0[i]].double())
                maps.append(tmap)
            out[f"{m}in_proj_weight"] = torch.cat(ws)
            if bs:
                out[f"{m}in_proj_bias"] = torch.cat(bs)
            wo = p0[f"{m}out_proj.weight"]
            wa, tmap = al.linear(wo, p1[f"{m}out_proj.weight"], maps[2], *act(op.module))
            out_rows(f"{m}out_proj.weight", wa, tmap)
            if f"{m}out_proj.bias" in p0:
                out_rows(f"{m}out_proj.bias", p0[f"{m}out_proj.bias"].double(), tmap)
            t = tmap
    return out


def _check_layouts(layouts: Sequence[tuple[list[Op], list[str]]]) -> None:
    ref = [op.kind for op in layouts[0][0]]
    for i, (ops, stream) in enumerate(layouts[1:], start=1):
        kinds = [op.kind for op in ops]
        if kinds != ref or len(stream) != len(layouts[0][1]):
            n0, n1 = ref.count("linear") + 1, kinds.count("linear") + 1
            raise SpliceError(
                f"OT fusion: models[{i}] has {n1} linear layers in {len(kinds)} steps, the "
                f"anchor {n0} in {len(ref)}; fusion needs models of the same depth and layout"
            )


def ot_fuse(
    models: Sequence[nn.Module],
    data: Tensor | None = None,
    *,
    anchor: int = 0,
    cost: Cost = "activations",
    solver: Solver = "sinkhorn",
    reg: float | None = None,
    residual: Residual = "mean",
    num_samples: int = 200,
    batch_size: int = 50,
    weights: Sequence[float] | None = None,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
) -> OTFusion:
    """Fuse ``models`` (≥ 2, same depth, any widths) into the anchor's architecture.

    ``data``: unlabeled inputs for activation costs (the first ``num_samples`` rows are
    used). ``reg``: Sinkhorn's entropy weight (default 0.08 for activations, 0.06 for weights,
    as the paper's configs). ``forward(model, batch)`` runs a model (default ``model(batch)``).

    Raises:
        SpliceError: fewer than two models, different depths or layouts, an unsupported
            module, activation costs without data, or a bad anchor / weights.
    """
    start = time.perf_counter()
    if len(models) < 2:
        raise SpliceError(f"OT fusion needs at least 2 models, got {len(models)}")
    if not 0 <= anchor < len(models):
        raise SpliceError(f"anchor {anchor} is not a model index (0..{len(models) - 1})")
    w = list(weights) if weights is not None else [1.0 / len(models)] * len(models)
    if len(w) != len(models) or abs(sum(w) - 1) > 1e-6:
        raise SpliceError(f"weights {w}: need one per model, summing to 1")
    if cost == "activations" and data is None:
        raise SpliceError("activation costs need data", fix="pass data=inputs or cost='weights'")
    layouts = [layout(m) for m in models]
    _check_layouts([layouts[anchor], *[lay for i, lay in enumerate(layouts) if i != anchor]])
    ops, stream = layouts[anchor]
    reg = reg if reg is not None else (0.08 if cost == "activations" else 0.06)
    al = _Aligner(cost, solver, reg, residual)
    run = forward or (lambda m, x: m(x))
    ref = models[anchor]
    acts_ref = _record(ref, ops, data[:num_samples], batch_size, run) if data is not None else {}
    params = dict(ref.named_parameters())
    fused = {n: w[anchor] * p.detach().double() for n, p in params.items()}
    for i, model in enumerate(models):
        if i == anchor:
            continue
        acts = None
        if cost == "activations" and data is not None:
            acts = (_record(model, ops, data[:num_samples], batch_size, run), acts_ref)
        aligned = _align(model, ref, ops, stream, acts, al)
        missing = set(params) - set(aligned)
        if missing:
            raise SpliceError(f"OT fusion could not align {sorted(missing)[:3]}")
        for n in params:
            fused[n] += w[i] * aligned[n]
    out = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(fused[n].to(p.dtype))
    info = {
        "models": len(models),
        "anchor": anchor,
        "cost": cost,
        "solver": solver,
        "reg": reg if solver == "sinkhorn" else 0.0,
        "steps": len(ops),
        "seconds": time.perf_counter() - start,
    }
    return OTFusion(out, info)
