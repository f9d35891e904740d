"""``splice train --select spt|rdp|id3 --budget N``: decide where to tune, then train there.

The selectors live in :mod:`splice.select`; this file feeds them the run's batches and model
and hands :func:`splice.train.hf.train` back what it needs: the adapter injected (SPT, RDP),
or an optimizer wrapper and an export after training (ID³). The choice is part of the saved
adapter (SPT/ID³ indices are adapter tensors, RDP's layers its record), so a reload reproduces
it; a summary goes to ``metrics.json`` under ``selection``.

Budgets: SPT — trainable adapter parameters; RDP — layers K; ID³ — weight entries B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pydantic
import torch
from torch import nn

from splice._schema import Strict
from splice.errors import SpliceError

__all__ = ["SELECTORS", "Selection", "select"]


class SPTOptions(Strict):
    batches: int = pydantic.Field(16, gt=0, description="mini-batches of the sensitivity pass")
    alpha: float = pydantic.Field(10.0, gt=0, description="structured when n_W ≥ P_struct/alpha")
    beta: float = pydantic.Field(5.0, gt=0, description="whole vector when n ≥ len/beta")
    r: int = pydantic.Field(8, gt=0, description="rank of the structured LoRA")


class RDPOptions(Strict):
    calibration: int = pydantic.Field(8, gt=0, description="training batches for the trajectory")
    pooling: Literal["mean", "last"] = "mean"
    mapping: Literal["producer", "consumer"] = "producer"
    endpoints: bool = pydantic.Field(False, description="the first/last points count as layers")


class ID3Options(Strict):
    horizon: int | None = pydantic.Field(None, gt=0, description="unmasking steps T (default: ½)")
    eps: float = pydantic.Field(1e-3, gt=0, description="ε of the D³ score")
    exp: float = pydantic.Field(0.0, ge=0, description="β of the D³ score")
    mask: Literal["d3", "random"] = pydantic.Field(
        "d3", description="random: a static random mask of B entries (the baseline)"
    )


SELECTORS: dict[str, type[Strict]] = {"spt": SPTOptions, "rdp": RDPOptions, "id3": ID3Options}


class Selection:
    """What a selector hands the run: a summary, an optimizer wrapper and a post-train step."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.adapted = True  # the model carries adapters while it trains
        self.wrap: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] = lambda o: o
        self.finish: Callable[[nn.Module], None] = lambda m: None


def _options(name: str, options: dict[str, Any]) -> Strict:
    from splice._schema import validate

    if name not in SELECTORS:
        raise SpliceError(f"unknown selector {name!r}", fix=f"choose from {sorted(SELECTORS)}")
    return validate(SELECTORS[name], options, prefix=f"--select {name} option ")


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
    from splice.adapters import inject

    opts = _options(cfg.select, cfg.select_options)
    if cfg.budget is None:
        raise SpliceError(f"--select {cfg.select} needs --budget", fix="e.g. --budget 4")

    def batch(i: int) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batches(i)[1].items()}

    if cfg.select == "rdp":
        from splice.select import rdp

        points = rdp.trajectory(model, [batch(i) for i in range(opts.calibration)], opts.pooling)
        chosen = rdp.select_layers(
            points, k=cfg.budget, mapping=opts.mapping, endpoints=opts.endpoints
        )
        inject(
            model, cfg.method, cfg.targets or default_targets, layers=chosen["layers"],
            modules_to_save=new_modules, **cfg.adapter,
        )  # fmt: skip
        return Selection({"selector": "rdp", "layers": chosen["layers"], "eps": chosen["eps"]})
    if cfg.select == "spt":
        from splice.select import spt

        loss = lambda b: model(**batch(b)).loss  # noqa: E731
        plan = spt.select(
            model, loss, cfg.budget, targets=cfg.targets, batches=opts.batches, r=opts.r,
            alpha=opts.alpha, beta=opts.beta,
        )  # fmt: skip
        spt.apply(model, plan, r=opts.r, modules_to_save=new_modules)
        return Selection({"selector": "spt", **plan.summary()})
    from splice.select._common import matrix_sites
    from splice.select.id3 import ID3, export

    sites = matrix_sites(model, cfg.targets)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[0] in new_modules)
    named = {f"{n}.weight": m.weight.requires_grad_(True) for n, (m, _) in sites.items()}
    horizon = opts.horizon or max(1, total_steps // 2)
    selection = Selection({"selector": "id3", "budget": cfg.budget, "horizon": horizon})
    selection.adapted = False
    holder: dict[str, ID3] = {}

    def wrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        holder["opt"] = ID3(optimizer, named, cfg.budget, horizon, opts.eps, opts.exp, opts.mask)
        return holder["opt"]

    def finish(m: nn.Module) -> None:
        transposed = [n for n, (_, t) in sites.items() if t]
        export(m, holder["opt"], new_modules, transposed=transposed)
        changes = holder["opt"].changes()
        selection.info["entries"] = {k: len(v[0]) for k, v in changes.items()}

    selection.wrap, selection.finish = wrap, finish
    return selection
