"""Statistics-matched latent perturbations and their three direction generators (other.md §7.2–7.4).

A raw direction ``z`` becomes ``δ = (z − μ(z)) / (σ(z) + 1e-6) · σ(h) + μ(h)``, with ``μ, σ``
the mean and unbiased standard deviation over the hidden coordinates of the reference state
``h``; ``δ`` is *added* to block ``ℓ``'s output, so it is as large as ``h`` itself. Directions:
``random`` (``z ~ N(0, I)`` from a fixed seed, one for all prompts), ``grad`` (the sign of
the gradient of a target's NLL with respect to block ``ℓ``'s output at position −2 of the
prompt+target sequence) and ``mean_diff`` (mean block-``ℓ`` output on one prompt set minus
another's, at each prompt's last token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from splice.probe import Hooks

__all__ = [
    "grad_direction",
    "last_token_states",
    "mean_diff_direction",
    "random_direction",
    "stats_matched",
]


def stats_matched(z: Tensor, h: Tensor) -> Tensor:
    """``z`` standardised over its last dim, then given ``h``'s mean and std (§7.2)."""
    z, ref = z.double(), h.double()
    unit = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
    return (unit * ref.std(-1, keepdim=True) + ref.mean(-1, keepdim=True)).to(h.dtype)


def random_direction(d: int, seed: int = 42) -> Tensor:
    """``z ~ N(0, I_d)`` from ``seed`` (§7.3: seed 42, the same direction for every prompt)."""
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def grad_direction(
    model: nn.Module,
    prompt_ids: Tensor,
    target_ids: Tensor,
    layer: int,
    *,
    sign: Literal["descent", "code"] = "descent",
) -> Tensor:
    """``∓sign(∇ NLL(target | prompt))`` at block ``layer``'s output, position −2 (§7.4).

    ``"descent"`` (default, [lib]) lowers the target's NLL to first order; ``"code"`` keeps
    the released code's ``+sign``. For ascent away from the model's own safe answer, pass
    that answer as ``target_ids`` with ``sign="code"``. The sign convention is [unverified].
    """
    ids = torch.cat([prompt_ids, target_ids], dim=-1).view(1, -1)
    n, d = ids.shape[1], _width(model)
    probe = torch.zeros(1, n, d, requires_grad=True)
    with Hooks(model) as h:
        h.add(layer, probe, positions="all")
        logits = model(ids).logits[0, prompt_ids.numel() - 1 : -1]
        loss = nn.functional.cross_entropy(logits.float(), ids[0, prompt_ids.numel() :])
        (grad,) = torch.autograd.grad(loss, probe)
    direction = grad[0, -2].sign()
    return -direction if sign == "descent" else direction


@torch.no_grad()
def last_token_states(model: nn.Module, prompts: Sequence[Tensor], layer: int) -> Tensor:
    """Block ``layer``'s output at each prompt's last token, ``[P, d]``."""
    rows = []
    with Hooks(model) as h:
        cap = h.capture(layer)
        for ids in prompts:
            cap.clear()
            model(ids.view(1, -1))
            rows.append(cap[layer][0, -1])
    return torch.stack(rows)


def mean_diff_direction(
    model: nn.Module, harmful: Sequence[Tensor], benign: Sequence[Tensor], layer: int
) -> Tensor:
    """Mean last-token state of ``harmful`` minus that of ``benign`` prompts (§7.4 "trojan")."""
    return last_token_states(model, harmful, layer).mean(0) - last_token_states(
        model, benign, layer
    ).mean(0)


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_size"):
        return int(config.hidden_size)
    return int(model.get_input_embeddings().weight.shape[1])
