"""RDP LoRA — layer selection by simplifying the hidden-state path over depth (Çelebi et al.,
arXiv 2604.19321, 2026; spec §11).

The frozen model's pooled hidden states ``p_0..p_L`` over a calibration set (p_0: embedding
output, p_ℓ: output of layer ℓ−1) form a polyline; Ramer–Douglas–Peucker keeps the interior
points farther than ε from the chord of their segment, recursively; LoRA goes on the layers
those points map to. [recon] per the spec: the pooling (mean over valid tokens, or the last
valid token), the point → layer mapping (``producer``: p_ℓ → layer ℓ−1, the default;
``consumer``: p_ℓ → layer ℓ) and whether the endpoints count are options. The paper's RDP is
parameter-free at a given ε; hitting a layer budget K is splice's choice: each point's
*threshold* (the largest ε that still keeps it — its distance, capped by its ancestors') gives
exactly the points RDP keeps at any ε, so K takes the K highest thresholds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.errors import SpliceError

__all__ = ["rdp", "select_layers", "thresholds", "to_layers", "trajectory"]

Pooling = Literal["mean", "last"]
Mapping = Literal["producer", "consumer"]


@torch.no_grad()
def trajectory(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], pooling: Pooling = "mean"
) -> Tensor:
    """Points (L+1, d): each depth's hidden state pooled over valid tokens and all examples
    (``mean``) or the last valid token's state averaged over examples (``last``).

    ``batches`` are model inputs (``input_ids``, ``attention_mask``, …); the model must return
    ``hidden_states`` (Hugging Face ``output_hidden_states=True``).

    Raises:
        SpliceError: no rows in the calibration data, or no hidden states returned.
    """
    if pooling not in ("mean", "last"):
        raise SpliceError(f"pooling {pooling!r} is not mean or last")
    total: Tensor | None = None
    rows = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = getattr(model(**inputs, output_hidden_states=True), "hidden_states", None)
        if not hidden:
            raise SpliceError(f"{type(model).__name__} returned no hidden_states")
        h = torch.stack([t.float() for t in hidden])  # (L+1, B, T, d)
        mask = batch.get("attention_mask")
        mask = torch.ones(h.shape[1:3]) if mask is None else mask.float().to(h.device)
        if pooling == "mean":  # per example, then summed over examples
            pooled = (h * mask[None, :, :, None]).sum(2) / mask.sum(1).clamp(min=1)[None, :, None]
        else:
            last = (mask.sum(1).long() - 1).clamp(min=0)
            pooled = h[:, torch.arange(h.shape[1]), last]
        total = pooled.sum(1) if total is None else total + pooled.sum(1)
        rows += h.shape[1]
    model.train(was_training)
    if total is None or rows == 0:
        raise SpliceError("the calibration data has no rows", fix="give at least 1 example")
    return total / rows


def _distances(points: Tensor, a: int, b: int) -> Tensor:
    """Perpendicular distance of points a+1..b-1 to the chord p_a→p_b (to p_a if it is 0)."""
    rel = points[a + 1 : b] - points[a]
    chord = points[b] - points[a]
    norm = chord.norm()
    if norm == 0:
        return rel.norm(dim=1)
    u = chord / norm
    return (rel - (rel @ u)[:, None] * u).norm(dim=1)


def thresholds(points: Tensor) -> Tensor:
    """Per point, the largest ε at which RDP keeps it (+inf for the two endpoints).

    RDP at ε keeps exactly the points whose threshold exceeds ε.
    """
    points = points.double()
    n = len(points)
    thr = torch.zeros(n, dtype=torch.float64)
    thr[0] = thr[-1] = float("inf")
    stack = [(0, n - 1, float("inf"))]
    while stack:
        a, b, cap = stack.pop()
        if b - a < 2:
            continue
        d = _distances(points, a, b)
        m = int(torch.argmax(d))
        t = min(float(d[m]), cap)
        thr[a + 1 + m] = t
        stack += [(a, a + 1 + m, t), (a + 1 + m, b, t)]
    return thr


def rdp(points: Tensor, eps: float) -> list[int]:
    """Indices RDP keeps at tolerance ``eps`` (the endpoints always)."""
    return [i for i, t in enumerate(thresholds(points).tolist()) if t > eps]


def to_layers(
    kept: Iterable[int], n_points: int, mapping: Mapping = "producer", endpoints: bool = False
) -> list[int]:
    """Layers of the kept points: p_ℓ → layer ℓ−1 (``producer``) or ℓ (``consumer``); the
    endpoints p_0, p_L count only with ``endpoints`` (and where the mapping gives a layer)."""
    shift = -1 if mapping == "producer" else 0
    last = n_points - 1
    return sorted(i + shift for i in kept if (endpoints or 0 < i < last) and 0 <= i + shift < last)


def select_layers(
    points: Tensor,
    *,
    eps: float | None = None,
    k: int | None = None,
    mapping: Mapping = "producer",
    endpoints: bool = False,
) -> dict[str, Any]:
    """The layers to adapt, at tolerance ``eps`` or for exactly ``k`` layers (the k highest
    thresholds, ties by depth); returns layers, the ε used and every point's threshold.

    Raises:
        SpliceError: neither or both of eps/k, or k outside 1..L.
    """
    if (eps is None) == (k is None):
        raise SpliceError("give exactly one of eps or k")
    if mapping not in ("producer", "consumer"):
        raise SpliceError(f"mapping {mapping!r} is not producer or consumer")
    thr = thresholds(points)
    n_layers = len(points) - 1
    if eps is not None:
        return {"layers": to_layers(rdp(points, eps), len(points), mapping, endpoints),
                "eps": eps, "thresholds": thr.tolist()}  # fmt: skip
    fixed = to_layers([0, len(points) - 1], len(points), mapping, endpoints)
    most = len(points) - 2 + len(fixed)  # interior points + the endpoint layers that count
    if not len(fixed) <= k <= most or k < 1:
        raise SpliceError(
            f"layer budget K={k} is outside {max(1, len(fixed))}..{most} "
            f"(the model has {n_layers} layers)",
            fix=f"choose K in {max(1, len(fixed))}..{most}",
        )
    interior = sorted(range(1, len(points) - 1), key=lambda i: (-float(thr[i]), i))
    chosen = interior[: k - len(fixed)]
    rest = [float(thr[i]) for i in interior[k - len(fixed) :]]
    eps_used = max(rest) if rest else 0.0
    layers = sorted({*fixed, *to_layers(chosen, len(points), mapping, endpoints=False)})
    return {"layers": layers, "eps": eps_used, "thresholds": thr.tolist()}
