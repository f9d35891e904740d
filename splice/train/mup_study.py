"""``splice analyze mup``: coordinate check and LR-transfer sweep on a from-scratch width family.

Families (:mod:`splice.analysis.mup_models`) and their offline tasks: ``mlp`` classifies
scikit-learn's bundled 8×8 digits (1,400 train images, batches of 64); ``gpt`` is a
character-level LM on standard-library docstrings (context 32, batches of 16). The loss a
sweep reports is the training-set loss after the fixed step budget (the quantity μP
transfers); the sweep zero-initialises the readout (§8.3's recommendation; the coordinate
check keeps the default init so step 0 shows the init scaling). Runs go through the one
loop (:mod:`splice.train.mup_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.analysis.coord_check import plot_coord_check, slopes
from splice.analysis.hp_transfer import plot_sweep, transfer_report
from splice.analysis.mup_models import GPT, MLP
from splice.analysis.report import Progress, markdown_table, no_progress
from splice.errors import SpliceError
from splice.train.mup_runs import coord_check, lr_sweep

__all__ = ["FAMILIES", "mup_study", "task"]

FAMILIES = ("mlp", "gpt")


def task(family: str, base: int, parametrization: str) -> dict[str, Any]:
    """Factory, batches, loss, evaluation, probe batch and module names of a family."""
    gen = lambda i: torch.Generator().manual_seed(i)  # noqa: E731
    if family == "mlp":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
        train = torch.randperm(len(x), generator=gen(0))[:1400]

        def batch(i: int) -> tuple[Tensor, Tensor]:
            idx = train[torch.randint(0, len(train), (64,), generator=gen(i))]
            return x[idx], y[idx]

        def factory(width: int) -> nn.Module:
            return MLP(64, width, 10, depth=3)

        loss = nn.functional.cross_entropy
        full = (x[train], y[train])
        names = ["embed", "layers.0", "layers.1", "readout"]
    elif family == "gpt":
        from splice.analysis.inputs import prose

        text = " ".join(prose(400)).encode("ascii", "replace")
        data = torch.tensor(list(text), dtype=torch.long).clamp(max=127)

        def batch(i: int) -> tuple[Tensor, Tensor]:
            start = torch.randint(0, len(data) - 33, (16,), generator=gen(i))
            rows = torch.stack([data[s : s + 33] for s in start.tolist()])
            return rows[:, :-1], rows[:, 1:]

        def factory(width: int) -> nn.Module:
            return GPT(
                128, width, depth=2, heads=4, context=32, attention=parametrization, base_width=base
            )

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

        full = tuple(torch.cat(t) for t in zip(*(batch(10_000 + j) for j in range(8)), strict=True))
        names = ["tok", "layers.0", "layers.1", "readout"]
    else:
        raise SpliceError(f"unknown family {family!r}", fix=f"choose from {list(FAMILIES)}")

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return loss(model(full[0]), full[1]).item()

    return {
        "factory": factory,
        "batch": batch,
        "loss": loss,
        "evaluate": evaluate,
        "probe": full[0][:64],
        "names": names,
    }


def mup_study(
    family: str,
    widths: Sequence[int],
    lrs: Sequence[float],
    *,
    steps: int = 30,
    seeds: Sequence[int] = (0, 1),
    parametrizations: Sequence[str] = ("mup", "sp"),
    coord_steps: int = 3,
    coord_lr: float = 2**-8,
    optimizer: str = "adam",
    progress: Progress = no_progress,
) -> tuple[dict[str, Any], str, dict[str, Callable]]:
    """``(data, markdown, figures)``: coordinate check and LR sweep per parametrisation.

    The base width is the smallest, the delta width the next; the target is the largest.
    """
    widths = sorted(widths)
    if len(widths) < 3 or len(set(widths)) != len(widths):
        raise SpliceError(
            f"widths {list(widths)} need at least 3 distinct values",
            fix="pass e.g. --widths 64,128,256,512,1024",
        )
    base, delta = widths[0], widths[1]
    data: dict[str, Any] = {
        "settings": {
            "family": family,
            "widths": widths,
            "lrs": list(lrs),
            "steps": steps,
            "seeds": list(seeds),
            "optimizer": optimizer,
            "base": base,
        }
    }
    tables, sweeps = {}, {}
    for p in parametrizations:
        t = task(family, base, p)
        run = {
            "base": base,
            "delta": delta,
            "batch": t["batch"],
            "loss": t["loss"],
            "parametrization": p,
            "optimizer": optimizer,
        }
        tick = progress(f"coord check {p}", 1)
        tables[p] = coord_check(
            t["factory"],
            widths,
            t["names"],
            probe=t["probe"],
            record=range(coord_steps + 1),
            lr=coord_lr,
            **run,
        )
        tick()
        tick = progress(f"LR sweep {p}", len(widths) * len(lrs))
        sweeps[p] = lr_sweep(
            t["factory"],
            widths,
            lrs,
            evaluate=t["evaluate"],
            seeds=seeds,
            steps=steps,
            progress=lambda w, lr, tick=tick: tick(),
            readout_zero_init=True,
            **run,
        )
        data[p] = {
            "coord_slopes": slopes(tables[p]),
            "coord_table": tables[p],
            "grid": sweeps[p],
            "transfer": transfer_report(sweeps[p], widths[-1]),
        }
    md = (
        f"# μP study: {family}, widths {widths}\n\n{optimizer}, {steps} steps, seeds "
        f"{list(seeds)}, LR grid {min(lrs):.3g}…{max(lrs):.3g} ({len(lrs)} points).\n\n"
    )
    rows = []
    for p in parametrizations:
        tr = data[p]["transfer"]
        worst = max(abs(s) for step in data[p]["coord_slopes"].values() for s in step.values())
        rows.append(
            [
                p,
                worst,
                tr["max_shift_steps"],
                tr["kappa"] or float("nan"),
                tr["gap_fit"]["p"],
                tr["fast_transfer"],
                " ".join(f"{tr['lr_star'][w]:.2e}" for w in widths),
            ]
        )
    md += markdown_table(
        ["param.", "max |coord slope|", "η* shift (grid steps)", "κ", "b", "fast", "η* per width"],
        rows,
    )
    figures = {
        "coord_check.png": lambda path: plot_coord_check(tables, path),
        "lr_sweep.png": lambda path: plot_sweep(sweeps, path),
    }
    return data, md, figures
