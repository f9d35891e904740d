"""Learning-rate schedules: multipliers of each param group's peak LR by optimizer step."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["linear_warmup_decay"]


def linear_warmup_decay(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps to the peak, then linear decay to 0 at ``total``
    (for ``torch.optim.lr_scheduler.LambdaLR``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
