"""Batch-norm re-estimation after quantization (spec other.md §4.5).

[lib] The paper folds each BN into its convolution, quantizes, re-inserts a BN initialised as
the identity on the folded affine, re-estimates its running statistics and folds back. With
per-output-channel weight quantization folding commutes with quantization (a channel's scale
absorbs the BN factor), so here the BN stays in place and only its running mean and variance
change, affine frozen.

:func:`reestimate_bn` without a reference is the paper's step: the running statistics become
those of the calibration set, so each channel leaves the BN with mean ``β`` and standard
deviation ``≈ |γ|``. That restores the float network's statistics only where the calibration
set is its training distribution; on other data (a digit task on an ImageNet backbone) it
moves the network away from the float one. With ``reference`` (the float model) each BN is set
so that its output on the calibration set has the per-channel mean and standard deviation the
float BN's output has on the same inputs: ``σ' = σ·s_Q/s_FP`` and ``μ' = m_Q − (m_FP − μ)·s_Q/s_FP``
(``m``, ``s``: the calibration mean and std of the BN input); on the training distribution this
is the paper's step again.

The same matching repairs a *merge* of networks with batch norm (splice's addition, after
REPAIR, Jordan et al., ICLR 2023, which renormalises interpolated networks to their
endpoints' statistics): merged weights shift each BN's input statistics away from those the
fine-tunes saw, and the frozen running statistics then mis-normalise. :func:`bn_targets` of
each fine-tune on its own task's inputs, :func:`pool_targets` over the tasks and
:func:`match_bn` on the merged model give one model whose normalised BN outputs have the
fine-tunes' pooled statistics (docs/merging.md, "Batch-norm repair").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.compress.capture import Forward, capture
from splice.compress.lockstep import Lockstep

__all__ = ["batchnorms", "bn_targets", "match_bn", "pool_targets", "reestimate_bn"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> list[str]:
    """Names of the batch-norm modules that track running statistics."""
    return [n for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats]


class _Moments:
    """Per-channel mean and (biased) variance of ``(B, C, ...)`` inputs, in float64, one
    batch at a time (Chan et al.'s pairwise update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = self.m2 = torch.zeros((), dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        n, m = flat.shape[1], flat.mean(1)
        delta, total = m - self.mean, self.count + n
        self.m2 = self.m2 + ((flat - m[:, None]) ** 2).sum(1) + delta**2 * self.count * n / total
        self.mean, self.count = self.mean + delta * n / total, total

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.m2 / self.count


def _input_stats(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    moments = _Moments()
    for x in xs:
        moments.add(x)
    return moments.result()


def _reference_stats(
    model: nn.Module, names: list[str], batches: Sequence[Any], forward: Forward
) -> dict[str, tuple[Tensor, Tensor]]:
    """Every BN's input statistics in one forward per batch (each BN's first call)."""
    moments, seen = {n: _Moments() for n in names}, set()

    def hook(name: str):
        def add(module: nn.Module, args: tuple) -> None:
            if name not in seen:
                seen.add(name)
                moments[name].add(args[0])

        return add

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            seen.clear()
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: m.result() for n, m in moments.items() if m.count}


def bn_targets(
    reference: nn.Module, batches: Sequence[Any], forward: Forward
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per BN of ``reference``: the mean and variance, on ``batches``, of its normalised
    output before the affine step, ``z = (x − μ)/√(σ² + ε)`` (``μ, σ²``: its running
    statistics; the variance is of ``x`` plus ``ε``, as the BN divides by it). What
    :func:`match_bn` makes another model's BNs reproduce."""
    names = batchnorms(reference)
    out = {}
    for n, (m, v) in _reference_stats(reference, names, batches, forward).items():
        bn = reference.get_submodule(n)
        var = bn.running_var.double() + bn.eps
        out[n] = ((m - bn.running_mean.double()) / var.sqrt(), (v + bn.eps) / var)
    return out


def pool_targets(
    targets: Sequence[Mapping[str, tuple[Tensor, Tensor]]], weights: Sequence[float]
) -> dict[str, tuple[Tensor, Tensor]]:
    """The moments of the mixture of several :func:`bn_targets` (each reference on its own
    data), weighted by ``weights`` (e.g. each one's sample count): one set of statistics for
    a model that serves every reference's data (a merge of several fine-tunes)."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for n in targets[0]:
        mean = sum(wi * t[n][0] for wi, t in zip(w, targets, strict=True))
        second = sum(wi * (t[n][1] + t[n][0] ** 2) for wi, t in zip(w, targets, strict=True))
        out[n] = (mean, second - mean**2)
    return out


@torch.no_grad()
def match_bn(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    targets: Mapping[str, tuple[Tensor, Tensor]],
) -> int:
    """Set each BN's running statistics so that its normalised output on ``batches`` has the
    mean and variance of ``targets`` (:func:`bn_targets`); BNs one at a time in module order,
    each seeing the inputs its predecessors fixed. Affine parameters unchanged. Returns the
    number of BNs set."""
    names = [n for n in batchnorms(model) if n in targets]
    was_training = model.training
    model.eval()
    batches = list(batches)
    with Lockstep(model, names, batches, forward) as steps:
        for n in names:
            bn = model.get_submodule(n)
            got = steps.take(n)
            xs = got[0] if got else capture(model, n, batches, forward, outputs=False)[0]
            m_q, v_q = _input_stats(xs)
            del xs, got
            m_z, v_z = targets[n]
            std = ((v_q + bn.eps) / v_z).sqrt()
            bn.running_mean.copy_(m_q - m_z * std)
            bn.running_var.copy_((std**2 - bn.eps).clamp_min(0))
            steps.release(n)
    model.train(was_training)
    return len(names)


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    reference: nn.Module | None = None,
) -> int:
    """Re-estimate every BN's running mean and variance on ``batches``; with ``reference``,
    match the reference's BN outputs instead (module docstring). Returns the BN count."""
    if reference is not None:
        batches = list(batches)
        return match_bn(model, batches, forward, bn_targets(reference, batches, forward))
    names = batchnorms(model)
    was_training = model.training
    saved = {}
    for n in names:
        bn = model.get_submodule(n)
        saved[n] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for n in names:
            bn = model.get_submodule(n)
            bn.momentum = saved[n]
            bn.eval()
        model.train(was_training)
    return len(names)
