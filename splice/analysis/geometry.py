"""Geometry of layer updates: tokenwise local fits and their metrics (other.md §6).

A layer transition ``x → y`` (block ``ℓ``'s input and output, rows = tokens) splits into a
tokenwise part ``t_i = A_i x_i`` and a residual ``r_i = y_i − t_i``; ``A_i`` is fitted on the
``k`` nearest *other* tokens (leave-one-out, :func:`splice.probe.knn_loo`) inside a
restricted class: ``diag`` (closed form per coordinate), ``rank`` (reduced-rank ridge: the
ridge fit's fitted values projected on their top-``r`` right singular directions) or
``global`` (one ridge map for all tokens, exact leave-one-out via the hat matrix). The
estimator is a [lib] reconstruction: the paper (arXiv 2604.02459) released no code.
Metrics are on the update scale: ``u = y − x``, ``tᵘ = t − x``, ``u = tᵘ + r``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from splice.probe import knn_loo

__all__ = ["FitClass", "fit_tokenwise", "layer_metrics", "spearman", "summarize"]

FitClass = Literal["diag", "rank", "global"]


def fit_tokenwise(
    x: Tensor,
    y: Tensor,
    *,
    fit: FitClass = "diag",
    k: int = 64,
    ridge: float = 1e-3,
    rank: int = 8,
    target: Literal["transition", "update"] = "transition",
    center: bool = False,
    leave_one_out: bool = True,
    chunk: int = 256,
) -> Tensor:
    """The tokenwise component ``t`` ``[N, d]`` of the transition ``x → y`` (§6.3).

    ``target="update"`` fits ``u = y − x`` instead of ``y`` and returns ``x + A x`` so the
    result is always on the transition scale. ``ridge`` is relative to the mean squared
    norm of the rows of ``x`` (scale-free). ``center`` fits on mean-centred ``x`` and target
    (an affine tokenwise map: ``t = A(x − x̄) + ȳ``), which also centres the kNN search.
    ``leave_one_out=False`` puts each token in its own neighbourhood (itself + its ``k − 1``
    nearest others): an in-sample fit that can partly memorise the token, for comparison
    with the [lib] default; the global class is always leave-one-out.
    """
    x, y = x.double(), y.double()
    if center:
        mx, my = x.mean(0), y.mean(0)
        t = fit_tokenwise(
            x - mx,
            y - my,
            fit=fit,
            k=k,
            ridge=ridge,
            rank=rank,
            target=target,
            leave_one_out=leave_one_out,
            chunk=chunk,
        )
        return t + my
    goal = y - x if target == "update" else y
    lam = ridge * x.pow(2).sum(1).mean()
    if fit == "global":
        t = _global_loo(x, goal, lam)
    else:
        nb = knn_loo(x, k) if leave_one_out else _with_self(x, k)
        parts = []
        for s in range(0, x.shape[0], chunk):
            xs, xn, yn = x[s : s + chunk], x[nb[s : s + chunk]], goal[nb[s : s + chunk]]
            parts.append(_diag(xs, xn, yn, lam) if fit == "diag" else _rank(xs, xn, yn, lam, rank))
        t = torch.cat(parts)
    return t + x if target == "update" else t


def _with_self(x: Tensor, k: int) -> Tensor:
    """Each row's own index, then its ``k − 1`` nearest other rows."""
    own = torch.arange(x.shape[0])[:, None]
    return own if k == 1 else torch.cat([own, knn_loo(x, k - 1)], 1)


def _diag(xs: Tensor, xn: Tensor, yn: Tensor, lam: Tensor) -> Tensor:
    """``a_c = Σ x_jc y_jc / (Σ x_jc² + λ)`` over the neighbours; ``t = a ⊙ x``."""
    a = (xn * yn).sum(1) / (xn.pow(2).sum(1) + lam / xs.shape[1])
    return a * xs


def _rank(xs: Tensor, xn: Tensor, yn: Tensor, lam: Tensor, rank: int) -> Tensor:
    """Reduced-rank ridge on each neighbourhood (dual form: ``k`` may be below ``d``)."""
    gram = xn @ xn.transpose(1, 2)  # [B, k, k]
    eye = torch.eye(gram.shape[1], dtype=gram.dtype)
    coef = torch.linalg.solve(gram + lam * eye, yn)  # A = Xnᵀ coef
    fitted = gram @ coef  # [B, k, d]
    v = torch.linalg.svd(fitted, full_matrices=False).Vh[:, :rank]  # [B, r, d]
    t = (xs.unsqueeze(1) @ xn.transpose(1, 2) @ coef).squeeze(1)  # x A
    return ((t.unsqueeze(1) @ v.transpose(1, 2)) @ v).squeeze(1)


def _global_loo(x: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """One ridge map for all tokens; the prediction of row ``i`` without row ``i``."""
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    inv = torch.linalg.inv(x.T @ x + lam * eye)
    fitted = x @ (inv @ (x.T @ y))
    lev = ((x @ inv) * x).sum(1, keepdim=True)  # hat-matrix diagonal
    return y - (y - fitted) / (1 - lev)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def layer_metrics(x: Tensor, y: Tensor, t: Tensor, *, energy: float = 0.9) -> dict[str, Tensor]:
    """Per-token metrics of §6.4 (alignment, angles, subspace projection, error).

    The dominant tokenwise subspace is spanned by the top right singular vectors of the
    stacked ``tᵘ`` that hold ``energy`` of its squared norm. ``cos_y_t`` / ``cos_y_r`` are the
    alignments on the transition scale (the next state ``y`` against ``t`` and ``r``).
    """
    x, y, t = x.double(), y.double(), t.double()
    u, tu = y - x, t - x
    r = u - tu
    sv = torch.linalg.svd(tu, full_matrices=False)
    cum = sv.S.pow(2).cumsum(0) / sv.S.pow(2).sum().clamp_min(1e-300)
    m = int((cum < energy).sum()) + 1
    basis = sv.Vh[:m]  # [m, d]

    def proj(v: Tensor) -> Tensor:
        return (v @ basis.T).pow(2).sum(1) / v.pow(2).sum(1).clamp_min(1e-300)

    cos_t, cos_r, cos_tr = _cos(u, tu), _cos(u, r), _cos(tu, r)
    return {
        "cos_u_t": cos_t,
        "cos_u_r": cos_r,
        "angle_u_t": torch.rad2deg(torch.arccos(cos_t.clamp(-1, 1))),
        "angle_u_r": torch.rad2deg(torch.arccos(cos_r.clamp(-1, 1))),
        "angle_t_r": torch.rad2deg(torch.arccos(cos_tr.clamp(-1, 1))),
        "proj_t": proj(tu),
        "proj_r": proj(r),
        "error": r.pow(2).sum(1) / u.pow(2).sum(1).clamp_min(1e-300),
        "subspace_dim": torch.tensor(float(m)),
        "energy": r.pow(2).sum() / u.pow(2).sum().clamp_min(1e-300),
        "cos_y_t": _cos(y, t),
        "cos_y_r": _cos(y, r),
    }


def summarize(values: Tensor) -> dict[str, float]:
    """Mean, median and inter-quartile range of per-token values."""
    v = values.double().flatten()
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
    return {"mean": v.mean().item(), "median": q[1], "iqr": q[2] - q[0]}


def spearman(a: Tensor | list[float], b: Tensor | list[float]) -> float:
    """Spearman's rank correlation (scipy; ties get average ranks)."""
    from scipy.stats import spearmanr

    rho = spearmanr(torch.as_tensor(a).double().numpy(), torch.as_tensor(b).double().numpy())
    return float(rho.statistic)
