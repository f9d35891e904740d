"""``splice train --select spt|rdp|id3 --budget N``: decide where to tune, then train there.

The selectors live in :mod:`splice.select`, run by :func:`splice.select.run.run`; this file
feeds it the run's batches (an HF model's ``.loss`` for SPT, the batches themselves for RDP's
trajectory) and hands :func:`splice.train.hf.train` back what it needs: the adapter injected
(SPT, RDP), or an optimizer wrapper and an export after training (ID³). The choice is part of
the saved adapter (SPT/ID³ indices are adapter tensors, RDP's layers its record), so a reload
reproduces it; a summary goes to ``metrics.json`` under ``selection``.

Budgets: SPT — trainable adapter parameters; RDP — layers K; ID³ — weight entries B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splice.errors import SpliceError
from splice.select.run import SELECTORS, ID3Options, RDPOptions, Selection, SPTOptions, options, run

__all__ = ["SELECTORS", "ID3Options", "RDPOptions", "SPTOptions", "Selection", "select"]


def select(
    cfg: Any,
    model: nn.Module,
    batches: Callable[[int], tuple[int | None, dict[str, torch.Tensor]]],
    device: torch.device,
    new_modules: list[str],
    default_targets: list[str] | None,
    total_steps: int,
) -> Selection:
    """Run ``cfg.select`` on ``model`` (already on ``device``) with the run's ``batches``."""
    opts = options(cfg.select, cfg.select_options)
    if cfg.budget is None:
        raise SpliceError(f"--select {cfg.select} needs --budget", fix="e.g. --budget 4")

    def batch(i: int) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batches(i)[1].items()}

    return run(
        cfg.select, opts, model, cfg.budget,
        loss=lambda i: model(**batch(i)).loss, inputs=batch,
        adapter=(cfg.method, cfg.targets or default_targets, cfg.adapter),
        weights=cfg.targets, modules_to_save=new_modules, steps=total_steps,
    )  # fmt: skip
