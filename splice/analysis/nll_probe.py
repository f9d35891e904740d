"""The NLL probe: how much a latent perturbation moves a model off its own answer (other.md §7.5).

For a prompt ``x`` and the model's own unperturbed response ``y``, the probe is the NLL of
``y`` given ``x`` with ``δ`` added to block ``ℓ``'s output on the positions that predict
response tokens (``|x|−1 … |x|+|y|−2``). Default [lib]: response tokens only, reported as
both sum and mean (the released code took HF's mean over prompt + response).
``ΔNLL = NLL_δ − NLL_clean``; a large rise means the perturbation leaves the aligned path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from splice.analysis.perturb import random_direction, stats_matched
from splice.probe import Hooks

__all__ = ["nll_landscape", "nll_probe", "reference_state", "response_nll"]


@torch.no_grad()
def response_nll(
    model: nn.Module,
    prompt_ids: Tensor,
    response_ids: Tensor,
    *,
    layer: int | None = None,
    delta: Tensor | None = None,
) -> tuple[float, float]:
    """``(sum, mean)`` NLL of the response tokens, with ``delta`` added at block ``layer``."""
    p, r = prompt_ids.numel(), response_ids.numel()
    ids = torch.cat([prompt_ids.view(-1), response_ids.view(-1)]).view(1, -1)
    with Hooks(model) as h:
        if delta is not None:
            h.add(layer, delta, positions=list(range(p - 1, p + r - 1)))
        logits = model(ids).logits[0, p - 1 : p + r - 1].double()
    nll = nn.functional.cross_entropy(logits, ids[0, p:], reduction="sum").item()
    return nll, nll / r


@torch.no_grad()
def reference_state(
    model: nn.Module,
    prompt_ids: Tensor,
    layer: int,
    source: Literal["block_output", "hf_index"] = "block_output",
) -> Tensor:
    """The state whose statistics ``δ`` takes: block ``layer``'s output at the last prompt
    token ([lib] default), or ``hidden_states[layer]`` (its input) as the released code does."""
    with Hooks(model) as h:
        cap = h.capture(layer, inputs=source == "hf_index")
        model(prompt_ids.view(1, -1))
    return cap[layer][0, -1]


def nll_probe(
    model: nn.Module,
    prompt_ids: Tensor,
    response_ids: Tensor,
    layers: Sequence[int],
    *,
    directions: dict[int, Tensor] | None = None,
    seed: int = 42,
    source: Literal["block_output", "hf_index"] = "block_output",
) -> dict[int, dict[str, float]]:
    """Per layer: clean and perturbed response NLL (sum, mean) and their differences.

    ``directions`` maps a layer to its raw direction (default: :func:`random_direction`).
    """
    clean_sum, clean_mean = response_nll(model, prompt_ids, response_ids)
    out = {}
    for layer in layers:
        ref = reference_state(model, prompt_ids, layer, source)
        z = (directions or {}).get(layer)
        z = random_direction(ref.numel(), seed) if z is None else z
        delta = stats_matched(z, ref)
        s, m = response_nll(model, prompt_ids, response_ids, layer=layer, delta=delta)
        out[layer] = {
            "nll_sum": s,
            "nll_mean": m,
            "clean_sum": clean_sum,
            "clean_mean": clean_mean,
            "delta_sum": s - clean_sum,
            "delta_mean": m - clean_mean,
        }
    return out


def nll_landscape(
    model: nn.Module,
    prompt_ids: Tensor,
    response_ids: Tensor,
    layer: int,
    first: Tensor,
    second: Tensor,
    grid: int = 11,
) -> Tensor:
    """Mean response NLL ``[grid, grid]`` for ``δ = α·first + β·second``, ``α, β ∈ [0, 1]``
    (§7.5's landscape; the paper used 50×50 over the gradient and random directions)."""
    steps = torch.linspace(0, 1, grid).tolist()
    out = torch.empty(grid, grid, dtype=torch.float64)
    for i, a in enumerate(steps):
        for j, b in enumerate(steps):
            delta = a * first + b * second
            out[i, j] = response_nll(model, prompt_ids, response_ids, layer=layer, delta=delta)[1]
    return out
