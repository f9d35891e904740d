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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.compress.capture import Forward, capture
from splice.compress.lockstep import Lockstep

__all__ = ["batchnorms", "reestimate_bn"]

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


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    reference: nn.Module | None = None,
) -> int:
    """Re-estimate every BN's running mean and variance on ``batches``; with ``reference``,
    match the reference's BN outputs instead (module docstring). Returns the BN count."""
    names = batchnorms(model)
    was_training = model.training
    model.eval()
    if reference is not None:
        batches = list(batches)
        fp_stats = _reference_stats(reference, names, batches, forward)
        with Lockstep(model, names, batches, forward) as q_steps:
            for n in names:  # in module order: each BN sees the inputs its predecessors fixed
                bn, ref = model.get_submodule(n), reference.get_submodule(n)
                got = q_steps.take(n)
                xs = got[0] if got else capture(model, n, batches, forward, outputs=False)[0]
                m_q, v_q = _input_stats(xs)
                del xs, got
                m_f, v_f = fp_stats.get(n) or _input_stats(
                    capture(reference, n, batches, forward, outputs=False)[0]
                )
                ratio = ((v_q + bn.eps) / (v_f + bn.eps)).sqrt()
                std = (ref.running_var.double() + bn.eps).sqrt() * ratio
                bn.running_mean.copy_(m_q - (m_f - ref.running_mean.double()) * ratio)
                bn.running_var.copy_((std**2 - bn.eps).clamp_min(0))
                q_steps.release(n)
        model.train(was_training)
        return len(names)
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
