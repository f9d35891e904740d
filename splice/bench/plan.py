"""The benchmark's cost model: every phase of a run estimated up front, on this machine.

Training and evaluation time is the backbone's matrix products, so it is proportional to the
examples passed through it. :func:`calibrate` times a forward pass over a few validation
examples of each task (seconds per example here); :func:`plan_run` multiplies that by each
phase's examples, with the factors below measured on the 2-core dev box (CPU seconds, so a
busy machine does not skew them). The estimate is a guide, not a promise: the progress lines
rescale it by what the finished phases took.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from splice.bench.progress import Phase, clock

__all__ = ["calibrate", "estimate_line", "plan_run"]

# Seconds per example, as multiples of the calibration's: (evaluation in length-sorted batches
# of 128, one training example: forward + backward + AdamW in batches padded to their longest).
FACTORS = {"text": (0.9, 2.15), "image": (1.1, 3.8)}
# Learned merges: (passes over every task's validation inputs, examples per task and step).
# AdaMerging and Concrete take a forward + backward of a 16-example batch per task and step,
# aTLAS adds its accuracy checks, LOT collects activations, OPCM is SVDs (data-free).
LEARNED_COST = {
    "adamerging": (0.0, 38.0),
    "atlas": (0.0, 52.0),
    "concrete": (0.0, 19.0),
    "lot": (1.5, 0.0),
    "opcm": (0.25, 0.0),
    "continual_task_arithmetic": (0.0, 0.0),
    # closed forms after statistics passes: Fisher a backward per example of 64, RegMean++ a
    # pass per block stopped after it (about (blocks + 1) / 2 passes on MiniLM's 6 + pooler)
    "fisher": (1.0, 0.0),
    "regmean": (1.0, 0.0),
    "regmean_plusplus": (4.0, 0.0),
}
_UNKNOWN_LEARNED = (1.0, 45.0)


def calibrate(encoder: Any, sets: Mapping[str, Any], per_task: int = 32) -> float:
    """Seconds per example of the pretrained backbone's forward pass on this machine.

    Times up to ``per_task`` examples of each set (in the evaluation's length order), after
    a warm-up batch."""
    device = next(encoder.module.parameters()).device
    batches = []
    for data in sets.values():
        n = min(per_task, len(data))
        batches.append(np.asarray([i for i in data.eval_order() if i < n]))
    with torch.inference_mode():
        encoder.features(next(iter(sets.values())).batch(batches[0][:4], device))
        start = time.perf_counter()
        for data, idx in zip(sets.values(), batches, strict=True):
            encoder.features(data.batch(idx, device))
    return (time.perf_counter() - start) / max(1, sum(len(b) for b in batches))


def _learned_s(spec: Any, n_val: int, n_tasks: int, per_example: float) -> float:
    from splice.merge.learned import learned

    method = learned.get(spec.method)
    params = method.params({**method.short, **spec.params}).model_dump()
    steps = sum(v for k, v in params.items() if k == "steps" or k.endswith("_steps"))
    passes, per_step = LEARNED_COST.get(spec.method, _UNKNOWN_LEARNED)
    return (passes * n_val + per_step * steps * n_tasks) * per_example


def plan_run(
    cfg: Any,
    specs: Sequence[Any],
    groups: Sequence[Any],
    per_example: Mapping[str, float],
    cached: Mapping[str, bool],
) -> list[Phase]:
    """Phases in run order for each (backbone group, seed): training per task (0 when
    ``cached[key]``), the reference rows, one per merge setting, the continual view."""
    from splice.bench.continual import continual_methods
    from splice.bench.merging import unsupported

    phases = []
    for g in groups:
        mod = g.encoder.modality
        evaluate, train = FACTORS.get(mod, (1.0, 3.0))
        t = per_example[mod] * evaluate
        n_tasks = len(g.data)
        n_test = sum(len(p) for p in g.test.values())
        n_val = sum(len(p) for p in g.val.values())
        per_task = cfg.train.steps * cfg.train.batch_size * train * per_example[mod]
        tuning = any(s.tune for s in specs)
        for seed in cfg.seeds:
            at = f"{mod}/{seed}"
            for name in g.data:
                key = f"train/{at}/{name}"
                phases.append(Phase(key, "train", 0.0 if cached[key] else per_task))
            refs = (2 * n_test + (n_val if tuning else 0)) * t
            phases.append(Phase(f"evaluate/{at}/references", "evaluate", refs))
            for spec in specs:
                if unsupported(spec, n_tasks):
                    est = 0.0
                elif spec.learned:
                    est = _learned_s(spec, n_val, n_tasks, t) + n_test * t
                else:
                    est = (len(spec.tune) * n_val + n_test) * t
                phases.append(Phase(f"evaluate/{at}/{spec.key}", "evaluate", est))
            names = continual_methods(specs) if cfg.continual_orders else []
            if names:
                # after task k of n: k/n of the test sets; the last is the merge row's (memo)
                learned_specs = {s.method: s for s in specs if s.learned}
                per_order = sum(
                    _learned_s(learned_specs[m], n_val, n_tasks, t) + (n_tasks - 1) / 2 * n_test * t
                    for m in names
                )
                phases.append(
                    Phase(f"continual/{at}", "continual", per_order * cfg.continual_orders)
                )
    return phases


def estimate_line(
    cfg: Any,
    specs: Sequence[Any],
    plan: Sequence[Phase],
    phases: Mapping[str, float],
    rate: Mapping[str, float],
) -> str:
    """The up-front estimate: total, training, evaluation, continual view, measured speed."""
    by_kind = {k: sum(p.est for p in plan if p.kind == k) for k in ("train", "evaluate")}
    rest = sum(p.est for p in plan) - sum(by_kind.values())
    speed = ", ".join(f"{m} {1000 * s:.1f} ms" for m, s in rate.items())
    return (
        f"estimate {clock(phases['estimate_s'])} on this machine: "
        f"{len(cfg.tasks)} tasks × {len(cfg.seeds)} seed(s), {len(specs)} merge settings; "
        f"load {clock(phases['load_s'])} (done), training {clock(by_kind['train'])}, "
        f"evaluation {clock(by_kind['evaluate'])}"
        + (f", continual view {clock(rest)}" if rest else "")
        + f" (forward pass per example: {speed})"
    )
