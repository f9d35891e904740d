"""Point-PEFT against full fine-tuning and LoRA on the point transformer (issue #34, item 3).

The point transformer is pretrained on primitive-shape classification
(:func:`splice.data.synthetic.points.primitives`) and cached; each method then adapts a fresh
copy to classify mnist_5k digits as 3-D clouds (:func:`~splice.data.synthetic.points.digit_clouds`,
4,000 train / 1,000 test) with a new head. LoRA (``qkv``/``proj`` of every block, through
:func:`splice.adapters.inject`) takes the rank whose trainable count is closest to Point-PEFT's.
Groups (FPS + kNN) are computed once per cloud: the backbone's grouping has no parameters.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from splice.adapters import inject, trainable_parameters
from splice.bench.domains.common import Row, Setup, batch_order, cached_pretrain, train
from splice.data.synthetic.points import digit_clouds, primitives
from splice.domains.backbones.points import Groups, PointConfig, PointTransformer, group
from splice.domains.point_peft import PointPEFT, memory_bank

__all__ = ["METHODS", "PointsSetup", "digits", "pretrained", "run_method"]

METHODS = ("full", "lora", "point-peft", "linear")


@dataclass(frozen=True)
class PointsSetup(Setup):
    """:class:`~splice.bench.domains.common.Setup` plus the clouds, the backbone and
    Point-PEFT's prompt tokens and adapter rank."""

    points: int = 256
    backbone: PointConfig = field(default_factory=PointConfig)
    pretrain_clouds: int = 4000
    tokens: int = 10
    r: int = 8


def _groups(xyz: np.ndarray, cfg: PointConfig) -> Groups:
    parts = [
        group(torch.from_numpy(xyz[i : i + 500]), cfg.groups, cfg.k)
        for i in range(0, len(xyz), 500)
    ]
    return Groups(torch.cat([p.centers for p in parts]), torch.cat([p.local for p in parts]))


def _take(g: Groups, idx: np.ndarray | slice) -> Groups:
    return Groups(g.centers[idx], g.local[idx])


def _fit(
    model: torch.nn.Module,
    g: Groups,
    y: Tensor,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    lrs=None,
):
    order = batch_order(len(y), batch, seed)

    def loss(step: int) -> tuple[Tensor, int]:
        i = order(step)
        return F.cross_entropy(model(_take(g, i)), y[i]), len(i)

    return train(model, loss, steps, lr, lrs=lrs)


@torch.no_grad()
def accuracy(model: torch.nn.Module, g: Groups, y: Tensor) -> float:
    model.eval()
    hits = sum(
        (model(_take(g, slice(i, i + 250))).argmax(-1) == y[i : i + 250]).sum().item()
        for i in range(0, len(y), 250)
    )
    return 100.0 * hits / len(y)


def pretrained(setup: PointsSetup) -> tuple[PointTransformer, dict[str, Any]]:
    """The backbone pretrained on primitives (cached); facts hold its held-out accuracy."""
    cfg = setup.backbone
    key = setup.pretrain_key("points", "backbone")

    def build(model: PointTransformer) -> dict[str, Any]:
        xyz, lab = primitives(setup.pretrain_clouds + 500, setup.points, seed=setup.seed + 100)
        g, y = _groups(xyz, cfg), torch.from_numpy(lab)
        n = setup.pretrain_clouds
        start = time.perf_counter()
        state = _fit(
            model,
            _take(g, slice(0, n)),
            y[:n],
            setup.pretrain_steps,
            setup.pretrain_lr,
            32,
            setup.seed,
        )
        acc = accuracy(model, _take(g, slice(n, None)), y[n:])
        return {
            "accuracy": acc,
            "seconds": time.perf_counter() - start,
            "final_loss": state.history[-1],
        }

    torch.manual_seed(setup.seed)
    return cached_pretrain("points", key, PointTransformer(cfg), build)


def digits(setup: PointsSetup) -> list[tuple[Groups, Tensor]]:
    """(groups, labels) of the digit clouds: train, validation, test (``setup.splits()``)."""
    from splice.data import TASKS

    images, labels, _ = TASKS.get("mnist_5k").read()
    order = np.random.default_rng(setup.seed).permutation(len(images))[: setup.train + setup.test]
    xyz, lab = digit_clouds(images[order], labels[order], setup.points, seed=setup.seed + 1)
    g, y = _groups(xyz, setup.backbone), torch.from_numpy(lab)
    return [(_take(g, s), y[s]) for s in setup.splits()]


def _lora_rank(backbone: PointTransformer, target: int) -> int:
    best, best_gap = 1, None
    for r in range(1, 33):
        m = _with_head(copy.deepcopy(backbone))
        inject(m, "lora", ["qkv", "proj"], r=r, alpha=2 * r, modules_to_save=["head"])
        gap = abs(trainable_parameters(m).trainable - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = r, gap
    return best


def _with_head(backbone: PointTransformer, classes: int = 10) -> PointTransformer:
    backbone.head = torch.nn.Linear(2 * backbone.cfg.dim, classes)
    return backbone


def build(
    method: str, backbone: PointTransformer, setup: PointsSetup, train_g: Groups, **options: Any
):
    """A fresh adapted copy of ``backbone`` for ``method``; ``options`` go to Point-PEFT."""
    torch.manual_seed(setup.seed + 7)
    net = copy.deepcopy(backbone)
    if method == "point-peft":
        bank = None
        if options.pop("bank", True):
            bank = memory_bank(
                net, (_take(train_g, slice(i, i + 256)) for i in range(0, 1024, 256)), 1024
            )
        tokens, r = options.pop("tokens", setup.tokens), options.pop("r", setup.r)
        return PointPEFT(net, 10, tokens=tokens, r=r, bank=bank, **options)
    net = _with_head(net)
    if method == "full":
        return net
    if method == "linear":
        for n, p in net.named_parameters():
            p.requires_grad_(n.startswith("head."))
        return net
    if method == "lora":
        ref = build("point-peft", backbone, setup, train_g, **options)
        r = _lora_rank(backbone, trainable_parameters(ref).trainable)
        return inject(net, "lora", ["qkv", "proj"], r=r, alpha=2 * r, modules_to_save=["head"])
    raise ValueError(method)


def run_method(
    method: str,
    setup: PointsSetup,
    backbone: PointTransformer,
    data,
    name: str | None = None,
    lr: float | None = None,
    **options,
) -> Row:
    """Adapt, train ``setup.steps`` steps, score on the test clouds; ``options`` go to
    :func:`build` (Point-PEFT's: ``tokens``, ``r``, ``k``, ``bank``, ``tau``, ``bank_weight``)."""
    (train_g, train_y), val, test = data
    start = time.perf_counter()
    model = build(method, backbone, setup, train_g, **options)
    lr = lr or (setup.full_lr if method == "full" else setup.lr)
    _fit(model, train_g, train_y, setup.steps, lr, setup.batch, setup.seed)
    return Row.of(
        name or method, model, accuracy(model, *test), start, {"val": accuracy(model, *val)}
    )
