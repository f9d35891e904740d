"""Width parametrisations as data (μP / SP / NTK), ``wrap`` and optimizer groups (other.md §8.3).

A dimension is *infinite* when it differs between a ``base`` and a ``delta`` model; its width
multiplier is ``dim / base_dim``. A parameter with one infinite dimension is *vector-like*
(embeddings, biases, norm gains) — or the *readout* when it is the weight of a Linear whose
input is infinite and output finite; two infinite dimensions make it *hidden*. Each
parametrisation is a table (:data:`RULES`) from class to exponents of multipliers: the
init-std factor (relative to PyTorch's default init, which is already ``∝ 1/fan_in``), the
forward multiplier, the Adam and SGD learning-rate factors and the bias init factor.
Weight decay is scaled inversely to the learning rate in every group (PyTorch's decoupled
``lr·wd`` then does not change with width), as microsoft/mup 1.0.0 does; μP's rows match its
``MuAdam``/``MuSGD``/``MuReadout``/``set_base_shapes`` (tests compare them). NTK is the
standard-init equivalent of the NTK parametrisation [derived]: SGD LR ``∝ 1/fan_in``, Adam
``∝ 1/√fan_in`` on matrices with an infinite fan-in. LoRA factors on a μP model would count
as vector-like (no LR rescaling); that choice is not settled by any source (§8.6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from splice.errors import SpliceError

__all__ = [
    "RULES",
    "Basis",
    "MuInfo",
    "ParamInfo",
    "Rule",
    "make_optimizer",
    "param_groups",
    "wrap",
]

Basis = Literal["width", "fan_in", "fan_out"]
"""``width``: the multiplier of the single (or fan-in) infinite dim; ``fan_in`` / ``fan_out``:
the multipliers of a weight's input and output dims (1 when finite)."""

Power = Mapping[Basis, float]


@dataclass(frozen=True)
class Rule:
    """Exponents of width multipliers for one parameter class (empty: unchanged)."""

    init_std: Power = field(default_factory=dict)
    forward: Power = field(default_factory=dict)
    adam_lr: Power = field(default_factory=dict)
    sgd_lr: Power = field(default_factory=dict)
    bias_init_std: Power = field(default_factory=dict)


RULES: dict[str, dict[str, Rule]] = {
    "mup": {
        "vector": Rule(sgd_lr={"width": 1}),
        "hidden": Rule(
            adam_lr={"fan_in": -1},
            sgd_lr={"fan_in": -1, "fan_out": 1},
            bias_init_std={"fan_in": 0.5},
        ),
        "readout": Rule(
            init_std={"width": 0.5},
            forward={"width": -1},
            sgd_lr={"width": 1},
            bias_init_std={"width": 0.5},
        ),
    },
    "sp": {"vector": Rule(), "hidden": Rule(), "readout": Rule()},
    "ntk": {
        "vector": Rule(),
        "hidden": Rule(adam_lr={"fan_in": -0.5}, sgd_lr={"fan_in": -1}),
        "readout": Rule(adam_lr={"fan_in": -0.5}, sgd_lr={"fan_in": -1}),
    },
}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter's class and the multipliers of its dims (``fan_out, fan_in`` for 2-D);
    a finite dim has multiplier 1 and ``inf`` False."""

    name: str
    kind: Literal["fixed", "vector", "hidden", "readout"]
    mults: tuple[float, ...]
    inf: tuple[bool, ...]

    def factor(self, power: Power) -> float:
        """``Π basis^exponent`` for this parameter."""
        out = 1.0
        for basis, exp in power.items():
            out *= self.basis(basis) ** exp
        return out

    def basis(self, basis: Basis) -> float:
        """The multiplier a rule's basis names (see :data:`Basis`)."""
        if basis == "fan_in":
            return self.mults[1] if len(self.mults) > 1 else 1.0
        if basis == "fan_out":
            return self.mults[0]
        inf = [m for m, i in zip(self.mults, self.inf, strict=True) if i]
        return inf[-1] if inf else 1.0  # the last infinite dim, as mup's ``main``


@dataclass
class MuInfo:
    """What :func:`wrap` decided: per-parameter classes, the rules and the readout modules."""

    params: dict[str, ParamInfo]
    rules: dict[str, Rule]
    parametrization: str
    readouts: list[str] = field(default_factory=list)


def _shapes(m: nn.Module | Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    if isinstance(m, nn.Module):
        return {n: tuple(p.shape) for n, p in m.named_parameters()}
    return {n: tuple(s) for n, s in m.items()}


def wrap(
    model: nn.Module,
    base: nn.Module | Mapping[str, tuple[int, ...]],
    delta: nn.Module | Mapping[str, tuple[int, ...]],
    *,
    parametrization: str = "mup",
    output_mult: float = 1.0,
    readout_zero_init: bool = False,
    rescale: bool = True,
) -> MuInfo:
    """Classify ``model``'s parameters against ``base``/``delta`` and apply ``parametrization``.

    Rescales the init in place (once; ``rescale=False`` for a model loaded from a
    checkpoint), and installs the readout's forward multiplier ``output_mult · m^forward``
    as a forward pre-hook. Use :func:`param_groups` for the optimizer.

    Raises:
        SpliceError: an unknown parametrisation, or shapes of ``model``, ``base`` and
            ``delta`` that do not line up (names the parameter).
    """
    if parametrization not in RULES:
        raise SpliceError(
            f"unknown parametrization {parametrization!r}", fix=f"choose from {sorted(RULES)}"
        )
    rules = RULES[parametrization]
    b, d, shapes = _shapes(base), _shapes(delta), _shapes(model)
    info = MuInfo({}, rules, parametrization)
    for name, shape in shapes.items():
        if name not in b or name not in d or not len(shape) == len(b[name]) == len(d[name]):
            raise SpliceError(
                f"parameter {name!r} {shape} has no matching base/delta shape",
                fix="build base and delta from the same model family (same names and ranks)",
            )
        inf = tuple(x != y for x, y in zip(b[name], d[name], strict=True))
        mults = tuple(s / bs if i else 1.0 for s, bs, i in zip(shape, b[name], inf, strict=True))
        kind = {0: "fixed", 1: "vector", 2: "hidden"}.get(sum(inf))
        if kind is None:
            raise SpliceError(f"parameter {name!r} has {sum(inf)} infinite dims; μP needs ≤ 2")
        info.params[name] = ParamInfo(name, kind, mults, inf)
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        wname = f"{mod_name}.weight" if mod_name else "weight"
        w = info.params[wname]
        if w.inf == (False, True):  # infinite input, finite output: the readout
            info.readouts.append(mod_name)
            info.params[wname] = ParamInfo(wname, "readout", w.mults, w.inf)
        _rescale(module, info.params[wname], info.rules, readout_zero_init, rescale, output_mult)
    return info


def _rescale(
    module: nn.Linear, w: ParamInfo, rules: dict[str, Rule], zero: bool, rescale: bool, out: float
) -> None:
    """Init factors of one Linear (and a readout's forward multiplier)."""
    if w.kind not in ("hidden", "readout"):
        return
    rule = rules[w.kind]
    if rescale:
        with torch.no_grad():
            if zero and w.kind == "readout":
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            module.weight.mul_(w.factor(rule.init_std))
            if module.bias is not None:
                module.bias.mul_(w.factor(rule.bias_init_std))
    if w.kind == "readout":
        mult = out * w.factor(rule.forward)
        if mult != 1.0:
            module.register_forward_pre_hook(lambda mod, args, m=mult: (args[0] * m, *args[1:]))


def param_groups(
    model: nn.Module,
    info: MuInfo,
    *,
    optimizer: Literal["adam", "adamw", "sgd"],
    lr: float,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups: one per distinct LR factor, weight decay divided by it.

    Groups keep the order in which their first parameter appears in ``model``.
    """
    key = "sgd_lr" if optimizer == "sgd" else "adam_lr"
    groups: dict[float, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pi = info.params[name]
        factor = 1.0 if pi.kind == "fixed" else pi.factor(getattr(info.rules[pi.kind], key))
        group = groups.setdefault(
            factor, {"params": [], "lr": lr * factor, "weight_decay": weight_decay / factor}
        )
        group["params"].append(p)
    return list(groups.values())


def make_optimizer(
    model: nn.Module,
    info: MuInfo,
    optimizer: Literal["adam", "adamw", "sgd"],
    lr: float,
    weight_decay: float = 0.0,
    **kwargs: object,
) -> torch.optim.Optimizer:
    """``torch.optim.{Adam, AdamW, SGD}`` over :func:`param_groups`."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if optimizer not in cls:
        raise SpliceError(f"unknown optimizer {optimizer!r}", fix=f"choose from {sorted(cls)}")
    groups = param_groups(model, info, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    return cls[optimizer](groups, lr=lr, **kwargs)
