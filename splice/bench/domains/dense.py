"""TAP-SLF and Polyhistor against per-task adapters and full multi-task fine-tuning on the
hierarchical backbone (issue #34, item 4).

The backbone is pretrained on garment classification
(:func:`splice.data.synthetic.dense.garments`) and cached; each method adapts a fresh copy
to four tasks on cluttered digits (:func:`~splice.data.synthetic.dense.cluttered_digits`,
4,000 train / 1,000 test): mask, saliency, edges, classification. Training visits the tasks
in turn, one task per step (so ``steps`` counts all tasks together); the score is the mean
of the four task scores (:func:`splice.domains.dense.task_score`). TAP-SLF's prompt ablation
is measured twice: the trained model with its prompts removed at test time, and a model
trained without prompts.
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

from splice.bench.domains.common import Row, Setup, batch_order, cached_pretrain, train
from splice.data.synthetic.dense import cluttered_digits, garments
from splice.domains.backbones.hier import HierBackbone, HierConfig
from splice.domains.dense import MultiTask, PerTaskAdapters, task_loss, task_score
from splice.domains.polyhistor import Polyhistor, PolyhistorLite
from splice.domains.tap_slf import TapSlf

__all__ = ["METHODS", "DenseSetup", "build", "pretrained", "run_method", "scores"]

METHODS = ("full", "per-task", "polyhistor", "polyhistor-lite", "tap-slf", "tap-slf-noprompt")


@dataclass(frozen=True)
class DenseSetup(Setup):
    """:class:`~splice.bench.domains.common.Setup` plus the backbone and its pretraining set."""

    pretrain_steps: int = 800
    steps: int = 400
    backbone: HierConfig = field(default_factory=HierConfig)
    pretrain_images: int = 20000


def pretrained(setup: DenseSetup) -> tuple[HierBackbone, dict[str, Any]]:
    """The backbone pretrained on garments (cached); facts hold its held-out accuracy."""
    key = setup.pretrain_key("backbone")

    def build(model: HierBackbone) -> dict[str, Any]:
        x, y = garments(setup.pretrain_images + 1000, seed=setup.seed + 100)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        n, order = setup.pretrain_images, batch_order(setup.pretrain_images, 64, setup.seed)

        def loss(step: int) -> tuple[Tensor, int]:
            i = order(step)
            return F.cross_entropy(model(x[i]), y[i]), len(i)

        start = time.perf_counter()
        state = train(model, loss, setup.pretrain_steps, setup.pretrain_lr)
        model.eval()
        with torch.no_grad():
            acc = 100.0 * (model(x[n:]).argmax(-1) == y[n:]).float().mean().item()
        return {
            "accuracy": acc,
            "seconds": time.perf_counter() - start,
            "final_loss": state.history[-1],
        }

    torch.manual_seed(setup.seed)
    return cached_pretrain("hier", key, HierBackbone(setup.backbone), build)


def data(setup: DenseSetup) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """(images, targets) of the cluttered digits: train, validation, test (``setup.splits()``)."""
    images, targets = cluttered_digits(setup.train + setup.test, seed=setup.seed + 1)
    x, t = torch.from_numpy(images), {k: torch.from_numpy(v) for k, v in targets.items()}
    return [(x[s], {k: v[s] for k, v in t.items()}) for s in setup.splits()]


def build(method: str, backbone: HierBackbone, setup: DenseSetup, **options: Any) -> MultiTask:
    """A fresh multi-task model of ``method`` on a copy of ``backbone``."""
    torch.manual_seed(setup.seed + 7)
    net = copy.deepcopy(backbone)
    if method == "full":
        return MultiTask(net, **options)
    if method == "per-task":
        return PerTaskAdapters(net, **options)
    if method == "polyhistor":
        return Polyhistor(net, **options)
    if method == "polyhistor-lite":
        return PolyhistorLite(net, **options)
    if method in ("tap-slf", "tap-slf-noprompt"):
        return TapSlf(net, prompts=method == "tap-slf", **options)
    raise ValueError(method)


def fit(
    model: MultiTask, x: Tensor, t: dict[str, Tensor], steps: int, lr: float, batch: int, seed: int
):
    """Tasks in turn, one per step, on one seeded batch order."""
    tasks = model.tasks
    order = batch_order(len(x), batch, seed)

    def loss(step: int) -> tuple[Tensor, int]:
        task, i = tasks[step % len(tasks)], order(step)
        return task_loss(task, model(x[i], task), t[task][i]), len(i)

    return train(model, loss, steps, lr)


@torch.no_grad()
def scores(model: MultiTask, x: Tensor, t: dict[str, Tensor]) -> dict[str, float]:
    """Each task's test score."""
    model.eval()
    out = {}
    for task in model.tasks:
        pred = torch.cat([model(x[i : i + 250], task) for i in range(0, len(x), 250)])
        out[task] = task_score(task, pred, t[task])
    return out


def run_method(
    method: str,
    setup: DenseSetup,
    backbone: HierBackbone,
    data_,
    name: str | None = None,
    lr: float | None = None,
    **options,
) -> Row:
    """Adapt, train ``setup.steps`` steps (tasks in turn), score every task on the test set."""
    (x, t), (xv, tv), (xt, tt) = data_
    start = time.perf_counter()
    model = build(method, backbone, setup, **options)
    fit(
        model,
        x,
        t,
        setup.steps,
        lr or (setup.full_lr if method == "full" else setup.lr),
        setup.batch,
        setup.seed,
    )
    s = scores(model, xt, tt)
    detail = {**s, "val": float(np.mean(list(scores(model, xv, tv).values())))}
    if isinstance(model, TapSlf) and len(model.prompt_groups):
        model.ablate = True
        detail["prompts removed"] = float(np.mean(list(scores(model, xt, tt).values())))
        model.ablate = False
    return Row.of(name or method, model, float(np.mean(list(s.values()))), start, detail)
