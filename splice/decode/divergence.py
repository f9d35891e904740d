"""The divergence registry of AMBEDKAR's verifier (spec other.md §2.3 step 3, §2.10).

Each entry maps the verifier's probabilities of one candidate under the factual (``a``) and the
counterfactual (``b``) context to a penalty ``D`` (``js_term`` and ``abs_diff`` are ≥ 0;
the ``kl_term`` ablation can be negative). ``js_term`` is what the released
code computes: token ``c``'s additive term of the full-vocabulary Jensen–Shannon divergence, not
the Bernoulli JS. ``js_full`` is the full-distribution JS used by the one-token-lookahead option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DIVERGENCES", "EPS", "js_full"]

EPS = 1e-10


def _js_term(a: Tensor, b: Tensor) -> Tensor:
    m = a + b
    return 0.5 * (a * torch.log(2 * a / m) + b * torch.log(2 * b / m))


def _kl_term(a: Tensor, b: Tensor) -> Tensor:
    return a * torch.log(a / b)


def _abs_diff(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs()


DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "js_term": _js_term,
    "kl_term": _kl_term,
    "abs_diff": _abs_diff,
}


def js_full(p: Tensor, q: Tensor) -> Tensor:
    """JS(P, Q) over the last dimension (natural log)."""
    p, q = p.clamp_min(EPS), q.clamp_min(EPS)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1))
