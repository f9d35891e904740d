"""The PEFT track's selector rows (issue #23): SPT-LoRA, RDP-LoRA, ID³ (:mod:`splice.select`).

They decide *where* the trainable parameters go, at LoRA's trainable count on the same
backbone (``--budget N``: at N), and train through the same loop and protocol as every other
row (:func:`splice.bench.finetune.train` with ``select=``): same seeded batches, AdamW, head
at the probe's lr, lr picked on validation. Settings (those of ``splice train --select``):

- ``spt``: sensitivity Σ_b (∂ℒ_b/∂w)² over 16 training mini-batches (the row's batch size,
  through the row's new head), τ′ swept to the budget over every Linear weight of the layer
  stack, LoRA r=8 (scale 1) where ``n_W ≥ P_struct/10``, the chosen entries elsewhere;
- ``rdp``: the frozen model's mean-pooled hidden states over 8 training mini-batches, K = ⌈L/2⌉
  layers by Ramer–Douglas–Peucker (producer mapping), LoRA on the backbone's targets of
  those layers with its rank raised to the count nearest the budget (α = 2r, as LoRA's 16/8);
- ``id3``: the ID³ optimizer wrapper on every Linear weight of the layer stack, B = budget
  entries unmasked over the first half of the steps (ε = 1e-3, β = 0), exported after
  training as a ``sparse`` adapter of exactly B entries. It trains the backbone's own weights,
  so its lr comes from full fine-tuning's grid: at the adapters' 1e-3/5e-3 with the track's
  constant lr its first unmasked entries wreck the features (rt_sentiment, 40 steps: validation
  55.3 / 58.0 % against the probe's 67.3 %).

SPT's plan and RDP's layers depend on the frozen backbone, the row's new head (seeded) and
its calibration batches (the seed's training stream), not on the lr: the lr grid computes
them once per (task, seed, budget) and each lr's run reuses them (:func:`prepare`).

The ``sparse`` method is what SPT and ID³ train, so it has no row of its own: they are its
rows. A backbone a selector cannot read (no Linear weights in a numbered layer stack, or no
hidden states for RDP) gets a "not applicable" row with the reason.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.select.run import ID3Options, RDPOptions, SPTOptions, run

__all__ = ["SELECTOR_ROWS", "Selected", "prepare", "selector_plans"]

SELECTOR_ROWS: dict[str, tuple[str, str]] = {  # key → (label, family)
    "spt": ("SPT-LoRA (selector)", "hybrid"),
    "rdp": ("RDP-LoRA (selector)", "reparameterized"),
    "id3": ("ID³ (selector)", "selective"),
}
# the settings of splice train --select at their defaults (one source for both)
# except SPT's precision: fp32 on every machine, so the track's rows do not depend on whether
# the CPU multiplies bfloat16 in hardware (the CLI's "auto")
SPT, RDP, ID3_OPTIONS = SPTOptions(precision="fp32"), RDPOptions(), ID3Options()
KEEP = 8  # selections kept for reuse (a plan is a few index tensors; 0: none)
_CHOSEN: OrderedDict[str, dict[str, Any]] = OrderedDict()


def selector_plans(
    keys: Sequence[str], encoder: Any, lora: Mapping[str, Any], budget: int
) -> list[dict[str, Any]]:
    """The rows of ``keys`` on ``encoder`` at ``budget`` trainable parameters; ``lora``: the
    LoRA row's options (RDP's rank and α start from them)."""
    from splice.adapters import METHODS
    from splice.adapters.inject import _config, find_sites
    from splice.select._common import layer_count, matrix_sites

    module, name = encoder.module, type(encoder.module).__name__
    plans = []
    for key in keys:
        label, family = SELECTOR_ROWS[key]
        plan: dict[str, Any] = {"key": key, "label": label, "kind": "selector",
                                "family": family, "options": {}}  # fmt: skip
        try:
            if key == "rdp":
                if getattr(getattr(module, "config", None), "output_hidden_states", None) is None:
                    raise SpliceError(f"{name} returns no hidden states (transformers models do)")
                sites = [s for _, _, s in find_sites(module, list(encoder.default_targets))]
                layers = layer_count(module)
                k = math.ceil(layers / 2)
                per_rank = sum(s.d_in + s.d_out for s in sites) / layers  # one layer, rank 1
                r = max(1, round(budget / (k * per_rank)))
                cfg = _config(METHODS.get("lora"), "lora", dict(lora))
                alpha = cfg.alpha * r / cfg.r
                plan["select"] = {"name": "rdp", "k": k, "r": r, "alpha": alpha, "budget": budget}
            else:
                matrix_sites(module)  # raises where there is nothing to rank
                plan["select"] = {"name": key, "budget": budget}
                if key == "id3":  # it trains the backbone's own weights: full FT's lr grid
                    plan["select"]["grid"] = "full"
        except SpliceError as e:
            plan["reason"] = f"{key} does not apply to {name}: {e.what}"
        plans.append(plan)
    return plans


@dataclass
class Selected:
    """What a selector hands the training loop: the parameters to train (besides the head),
    an optimizer wrapper, and the step after training that returns the adapter's parameters."""

    params: list[nn.Parameter]
    info: dict[str, Any]
    finish: Callable[[], list[nn.Parameter]]
    wrap: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] = lambda o: o


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        for k in sorted(obj):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _digest(o, h)
    else:
        h.update(repr(obj).encode())


def _memo(what: list[Any], head: nn.Module, drawn: list[Any]) -> dict[str, Any] | None:
    """The memo (:func:`splice.select.run.run`) of ``what`` with this head and these
    calibration batches: the same dict for every run that shares them."""
    if KEEP <= 0:
        return None
    h = hashlib.sha256()
    _digest([what, head.state_dict(), drawn], h)
    key = h.hexdigest()
    memo = _CHOSEN.pop(key, {})
    _CHOSEN[key] = memo
    while len(_CHOSEN) > KEEP:
        _CHOSEN.popitem(last=False)
    return memo


def prepare(
    select: Mapping[str, Any],
    model: nn.Module,
    head: nn.Module,
    encoder: Any,
    batches: Callable[[], tuple[Any, Tensor]],
    targets: Sequence[str],
    steps: int,
) -> Selected:
    """Run the selector ``select`` (a plan's ``select`` entry) on ``model`` (frozen, in eval
    mode) with ``batches()`` → (model inputs, labels) from the training split, through
    :func:`splice.select.run.run` (as ``splice train --select`` does)."""
    name = select["name"]
    if name not in SELECTOR_ROWS:
        raise SpliceError(f"unknown selector row {name!r}", fix=f"one of {sorted(SELECTOR_ROWS)}")

    rdp = name == "rdp"  # its budget is K layers, its LoRA's rank and α the plan's
    drawn = [
        batches() for _ in range(0 if name == "id3" else RDP.calibration if rdp else SPT.batches)
    ]

    def loss(i: int) -> Tensor:
        x, y = drawn[i]
        return nn.functional.cross_entropy(head(encoder.features(x, module=model)), y)

    lora = {"r": int(select["r"]), "alpha": float(select["alpha"])} if rdp else {}
    chosen = run(
        name, {"spt": SPT, "rdp": RDP, "id3": ID3_OPTIONS}[name], model,
        int(select["k"] if rdp else select["budget"]), loss=loss,
        inputs=lambda i: drawn[i][0], adapter=("lora", list(targets), lora), steps=steps,
        memo=None if name == "id3" else _memo([name, dict(select), encoder.key], head, drawn),
    )  # fmt: skip
    info = chosen.info
    if name == "id3":

        def finish() -> list[nn.Parameter]:  # ID³ exports its entries as a sparse adapter
            chosen.finish(model)
            return _trainable(model)

        return Selected(_trainable(model), {"horizon": info["horizon"]}, finish, chosen.wrap)
    if rdp:
        info = {"layers": info["layers"], "r": select["r"]}
    else:
        info = {
            "lowrank": len(info["lowrank"]),
            "sparse": len(info["entries"]),
            "total": info["total"],
        }
    params = _trainable(model)
    return Selected(params, info, lambda: params)
