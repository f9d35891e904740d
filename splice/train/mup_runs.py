"""Training runs of the μP studies (other.md §8.4): coordinate check and LR sweep per width.

Every run steps through the one loop (:class:`splice.train.loop.TrainStep` and ``fit``);
the models, rules and diagnostics are :mod:`splice.analysis` pieces. ``factory(width)``
builds a fresh model; ``base``/``delta`` widths name the infinite dimensions for
:func:`splice.analysis.mup.wrap`. ``batch(step)`` gives ``(inputs, targets)`` and
``loss(model(inputs), targets)`` the scalar loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from splice.analysis.coord_check import Table, record_sizes
from splice.analysis.mup import make_optimizer, wrap
from splice.train.loop import TrainStep, fit

__all__ = ["coord_check", "lr_sweep", "train_width"]

Factory = Callable[[int], nn.Module]
Batch = Callable[[int], tuple[Tensor, Tensor]]
Loss = Callable[[Tensor, Tensor], Tensor]


def train_width(
    factory: Factory,
    width: int,
    *,
    base: int,
    delta: int,
    batch: Batch,
    loss: Loss,
    lr: float,
    steps: int,
    parametrization: str = "mup",
    optimizer: str = "adam",
    seed: int = 0,
    readout_zero_init: bool = False,
    on_step: Callable[[nn.Module, int], None] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Build, wrap and train one model; ``on_step(model, step)`` runs before step 0 and after
    every step. Returns the model and its loss history."""
    torch.manual_seed(seed)
    model = factory(width)
    info = wrap(
        model,
        factory(base),
        factory(delta),
        parametrization=parametrization,
        readout_zero_init=readout_zero_init,
    )
    opt = make_optimizer(model, info, optimizer, lr)

    def micro(i: int) -> tuple[Tensor, int]:
        x, y = batch(i)
        return loss(model(x), y), len(x)

    if on_step is not None:
        on_step(model, 0)
    state = fit(
        TrainStep(micro, opt),
        steps,
        on_step=None if on_step is None else (lambda step, value: on_step(model, step)),
    )
    return model, state.history


def coord_check(
    factory: Factory,
    widths: Sequence[int],
    names: Sequence[str],
    *,
    probe: Tensor,
    record: Sequence[int] = (0, 1, 2, 3),
    **run: object,
) -> Table:
    """``table[width][step][module]``: mean ``|output|`` on ``probe`` at the ``record`` steps;
    ``run`` goes to :func:`train_width` (``base``, ``delta``, ``batch``, ``loss``, ``lr`` …)."""
    table: Table = {}
    for width in widths:
        table[width] = {}

        def keep(model: nn.Module, step: int, width: int = width) -> None:
            if step in record:
                table[width][step] = record_sizes(model, probe, names)

        train_width(factory, width, steps=max(record), on_step=keep, **run)
    return table


def lr_sweep(
    factory: Factory,
    widths: Sequence[int],
    lrs: Sequence[float],
    *,
    evaluate: Callable[[nn.Module], float],
    seeds: Sequence[int] = (0,),
    progress: Callable[[int, float], None] | None = None,
    **run: object,
) -> dict[int, dict[float, float]]:
    """``grid[width][lr]``: ``evaluate(model)`` after training, averaged over ``seeds``
    (a diverged run counts as ``inf``)."""
    grid: dict[int, dict[float, float]] = {}
    for width in widths:
        grid[width] = {}
        for lr in lrs:
            values = []
            for seed in seeds:
                model, history = train_width(factory, width, lr=lr, seed=seed, **run)
                value = evaluate(model) if math.isfinite(history[-1]) else math.inf
                values.append(value if math.isfinite(value) else math.inf)
            grid[width][lr] = sum(values) / len(values)
            if progress is not None:
                progress(width, lr)
    return grid
