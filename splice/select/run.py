"""Running a selector on a model: the glue that ``splice train --select`` and the PEFT track's
selector rows (``splice.bench.peft_select``) share, whatever their batches look like.

The caller hands over a loss for mini-batch i (SPT's sensitivity pass: an HF model's ``.loss``
in ``splice train``, encoder features through a new head in the bench) and the model inputs of
calibration batch i (RDP's hidden-state trajectory); :func:`run` returns a :class:`Selection`:
the adapter injected (SPT, RDP), or an optimizer wrapper and an export after training (ID³).

Budgets: SPT — trainable adapter parameters; RDP — layers K; ID³ — weight entries B.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pydantic
import torch
from torch import Tensor, nn

from splice._schema import Strict
from splice.errors import SpliceError

__all__ = ["SELECTORS", "ID3Options", "RDPOptions", "SPTOptions", "Selection", "options", "run"]


class SPTOptions(Strict):
    batches: int = pydantic.Field(16, gt=0, description="mini-batches of the sensitivity pass")
    alpha: float = pydantic.Field(10.0, gt=0, description="structured when n_W ≥ P_struct/alpha")
    beta: float = pydantic.Field(5.0, gt=0, description="whole vector when n ≥ len/beta")
    r: int = pydantic.Field(8, gt=0, description="rank of the structured LoRA")
    precision: Literal["auto", "fp32", "bf16"] = pydantic.Field(
        "auto",
        description="the sensitivity pass's matrix products (bf16: autocast; auto: bf16 where "
        "the device multiplies bfloat16 in hardware, else fp32)",
    )


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


def options(name: str, given: Mapping[str, Any]) -> Strict:
    """The validated options of selector ``name`` (``--select-set`` values, defaults filled)."""
    from splice._schema import validate

    if name not in SELECTORS:
        raise SpliceError(f"unknown selector {name!r}", fix=f"choose from {sorted(SELECTORS)}")
    return validate(
        SELECTORS[name],
        dict(given),
        prefix=f"--select {name} option ",
        show_input=True,
        fix=f"see `splice train --help` and docs/select.md for {name}'s options",
    )


def run(
    name: str,
    opts: Strict,
    model: nn.Module,
    budget: int,
    *,
    loss: Callable[[int], Tensor],
    inputs: Callable[[int], Any],
    adapter: tuple[str, Sequence[str] | None, Mapping[str, Any]],
    weights: Sequence[str] | None = None,
    modules_to_save: Sequence[str] = (),
    steps: int = 1,
    memo: dict[str, Any] | None = None,
) -> Selection:
    """Run selector ``name`` with ``opts`` (:func:`options`) on ``model``.

    ``loss(i)``: the loss of training mini-batch i (SPT); ``inputs(i)``: the model inputs of
    calibration batch i (RDP); ``adapter``: (method, targets, options) that RDP injects on its
    layers; ``weights``: the matrices SPT and ID³ rank (module-name suffixes; default every
    Linear of the layer stack); ``modules_to_save``: new modules that train in full (a head);
    ``steps``: the run's length (ID³'s horizon defaults to half of it); ``memo``: where SPT's
    plan and RDP's layers are kept and found again: a caller whose runs share the model, the
    loss and calibration batches and the budget (the PEFT track's lr grid) passes the same
    dict to each, and only the first runs the selector.
    """
    from splice.adapters import inject

    if name == "rdp":
        from splice.select import rdp

        chosen = (memo or {}).get("rdp")
        if chosen is None:
            calibration = [inputs(i) for i in range(opts.calibration)]
            points = rdp.trajectory(model, calibration, opts.pooling)
            chosen = rdp.select_layers(
                points, k=budget, mapping=opts.mapping, endpoints=opts.endpoints
            )
            if memo is not None:
                memo["rdp"] = chosen
        method, targets, settings = adapter
        inject(
            model, method, targets, layers=chosen["layers"],
            modules_to_save=modules_to_save, **settings,
        )  # fmt: skip
        return Selection({"selector": "rdp", "layers": chosen["layers"], "eps": chosen["eps"]})
    if name == "spt":
        from splice.select import spt

        plan = (memo or {}).get("spt")
        if plan is None:
            plan = spt.select(
                model, loss, budget, targets=weights, batches=opts.batches, r=opts.r,
                alpha=opts.alpha, beta=opts.beta, precision=opts.precision,
            )  # fmt: skip
            if memo is not None:
                memo["spt"] = plan
        spt.apply(model, plan, r=opts.r, modules_to_save=modules_to_save)
        return Selection({"selector": "spt", **plan.summary()})
    if name != "id3":
        raise SpliceError(f"unknown selector {name!r}", fix=f"choose from {sorted(SELECTORS)}")
    from splice.select._common import matrix_sites
    from splice.select.id3 import ID3, export

    sites = matrix_sites(model, weights)
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.rsplit(".", 1)[0] in modules_to_save)
    named = {f"{n}.weight": m.weight.requires_grad_(True) for n, (m, _) in sites.items()}
    horizon = opts.horizon or max(1, steps // 2)
    selection = Selection({"selector": "id3", "budget": budget, "horizon": horizon})
    selection.adapted = False  # it trains the backbone's own weights, masked
    holder: dict[str, ID3] = {}

    def wrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        holder["opt"] = ID3(optimizer, named, budget, horizon, opts.eps, opts.exp, opts.mask)
        return holder["opt"]

    def finish(m: nn.Module) -> None:  # the unmasked entries become a sparse adapter
        transposed = [n for n, (_, t) in sites.items() if t]
        export(m, holder["opt"], modules_to_save, transposed=transposed)
        changes = holder["opt"].changes()
        selection.info["entries"] = {k: len(v[0]) for k, v in changes.items()}

    selection.wrap, selection.finish = wrap, finish
    return selection
