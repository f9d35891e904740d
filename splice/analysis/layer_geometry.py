"""The layer-geometry study on a model: capture, fit, replace-and-continue, correlate (§6.4).

For each chosen block ``ℓ``: its inputs and outputs on a token sample, the tokenwise fit of
:func:`splice.analysis.geometry.fit_tokenwise`, the metrics of ``layer_metrics``, and the
*output perturbation*: block ``ℓ``'s output is replaced by the tokenwise approximation (the
residual dropped) and the model continues; a causal LM reports the per-position
``KL(p_full ‖ p_approx)``, a model without logits the relative change of its last hidden
state. The *functional link* is Spearman's ρ between approximation error and output change,
within each layer (over tokens) and across layers (over layer means).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.analysis.geometry import FitClass, fit_tokenwise, layer_metrics, spearman, summarize
from splice.probe import Hooks, check_layers

__all__ = ["GEOMETRY_KEYS", "geometry_study"]

GEOMETRY_KEYS = ("cos_u_t", "cos_u_r", "angle_u_t", "angle_u_r", "angle_t_r", "proj_t", "proj_r")


def _final(out: Any) -> tuple[Tensor, bool]:
    """(the model's final output, whether it is logits)."""
    if getattr(out, "logits", None) is not None:
        return out.logits, True
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], False


def _change(clean: Tensor, new: Tensor, logits: bool) -> Tensor:
    """Per-position output change: KL(clean ‖ new) for logits, else relative L2."""
    if logits:
        p = clean.double().log_softmax(-1)
        q = new.double().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)
    return (new - clean).double().norm(dim=-1) / clean.double().norm(dim=-1).clamp_min(1e-12)


@torch.no_grad()
def geometry_study(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    layers: Sequence[int],
    *,
    fit: FitClass = "diag",
    k: int = 64,
    ridge: float = 1e-3,
    rank: int = 8,
    target: str = "transition",
    center: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the §6 study on ``batches`` (``input_ids`` and optional ``attention_mask``).

    Returns ``{"layers": {ℓ: {metric: {mean, median, iqr}, "energy", "kl", "rho"}},
    "rho_across", "tokens", "output_change"}``; padding positions are left out.
    """
    with Hooks(model) as h:
        layers = check_layers(list(layers), h.n)
        cap_in = h.capture(layers, inputs=True)
        cap_out = h.capture(layers)
        finals, masks = [], []
        for batch in batches:
            out, is_logits = _final(model(**batch))
            finals.append(out)
            ids = batch["input_ids"]
            masks.append(batch.get("attention_mask", torch.ones_like(ids)).bool())
        xs = {i: cap_in.calls[i] for i in layers}
        ys = {i: cap_out.calls[i] for i in layers}
    report: dict[str, Any] = {"layers": {}, "tokens": int(sum(m.sum() for m in masks))}
    report["output_change"] = "kl" if is_logits else "relative_l2_last_hidden"
    for layer in layers:
        x = torch.cat([a[m] for a, m in zip(xs[layer], masks, strict=True)])
        y = torch.cat([a[m] for a, m in zip(ys[layer], masks, strict=True)])
        t = fit_tokenwise(x, y, fit=fit, k=k, ridge=ridge, rank=rank, target=target, center=center)
        met = layer_metrics(x, y, t)
        change = _replace_run(model, batches, masks, finals, layer, t, is_logits)
        row = {key: summarize(met[key]) for key in (*GEOMETRY_KEYS, "error", "cos_y_t", "cos_y_r")}
        row["energy"] = met["energy"].item()
        row["subspace_dim"] = int(met["subspace_dim"].item())
        row["output_change"] = summarize(change)
        row["rho"] = spearman(met["error"], change)
        report["layers"][layer] = row
        if on_layer is not None:
            on_layer(layer)
    rows = report["layers"].values()
    errors = [r["error"]["mean"] for r in rows]
    changes = [r["output_change"]["mean"] for r in rows]
    report["rho_across"] = spearman(errors, changes) if len(layers) > 2 else None
    return report


def _replace_run(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    masks: list[Tensor],
    finals: list[Tensor],
    layer: int,
    t: Tensor,
    is_logits: bool,
) -> Tensor:
    """Output change per valid token when block ``layer`` outputs the tokenwise part ``t``."""
    changes, start = [], 0
    for batch, mask, clean in zip(batches, masks, finals, strict=True):
        rows = t[start : start + int(mask.sum())]
        start += rows.shape[0]

        def swap(hidden: Tensor, pos: Tensor, rows: Tensor = rows, mask: Tensor = mask) -> Tensor:
            new = hidden.clone()
            new[mask] = rows.to(hidden.dtype)
            return new

        with Hooks(model) as h:
            h.replace(layer, swap)
            new, _ = _final(model(**batch))
        changes.append(_change(clean, new, is_logits)[mask])
    return torch.cat(changes)
