"""The benchmark run: fine-tune each task, then evaluate zero-shot, individual and merged models.

Per seed and per backbone (text tasks share MiniLM, image tasks EfficientNet-Lite0):
1. fine-tune every task (cached), giving its deltas and its linear head;
2. evaluate on each task's test split, always with that task's own head:
   - zero-shot: the pretrained backbone (the head trained in the task's run, ΔW removed);
   - individual: the backbone plus the task's own ΔW;
   - every merge setting (:func:`splice.bench.merging.merge_specs`) over all tasks' weights,
     with λ, where tuned, chosen on the validation splits by average normalized accuracy.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from pydantic import Field

from splice._schema import Strict
from splice.bench.continual import continual_methods, run_continual
from splice.bench.finetune import (
    FinetuneConfig,
    TaskRun,
    finetune_cached,
    is_cached,
)
from splice.bench.journal import Journal
from splice.bench.merging import MergeSpec, merge_specs, scale_param
from splice.bench.plan import calibrate, estimate_line, plan_run
from splice.bench.progress import Progress
from splice.bench.rows import Row, evaluate_rows, resumed
from splice.bench.suite import Suite
from splice.data.encoders import Encoder, Prepared, load_encoder
from splice.data.local import resolve_task
from splice.data.registry import Caps, TaskData, load_task
from splice.merge.base import methods

__all__ = ["PROFILES", "BenchConfig", "Row", "configure", "run_bench"]

TEXT_TASKS = (
    "rt_sentiment",
    "subjectivity",
    "tweet_sentiment",
    "fortune_topic",
    "wordnet_supersense",
    "convention_party",
)
VISION_TASKS = ("fashion_mnist", "mnist_5k", "animal_mnist", "sk_digits")
# The quick profile's merge settings, each at its defaults: the sum of task vectors, the
# classic interference fix, and the best data-driven and the continual merge (issue #21: the
# quick run fits 10 minutes on a slow 2-core box; each setting costs one pass over the test
# sets). The full profile runs every registered method, λ grids and the continual view.
QUICK_METHODS = ("task_arithmetic", "ties", "lot", "opcm")


class BenchConfig(Strict):
    """Everything that defines a benchmark run (written into results.json).

    The defaults are the quick profile's settings.
    """

    tasks: tuple[str, ...] = Field(description="task names, or paths to CSV/JSONL/image folders")
    methods: tuple[str, ...] | None = Field(
        QUICK_METHODS, description="merge methods (transforms, learned methods); None = all"
    )
    train: FinetuneConfig = FinetuneConfig()
    seeds: tuple[int, ...] = (0,)
    caps: tuple[int, int, int] = Field((2000, 150, 400), description="train/val/test caps")
    split_seed: int = 0
    max_len: int = Field(32, description="text: tokens per example")
    image_size: int = Field(32, description="vision: input side in pixels")
    text_model: str = Field("minilm", description="'minilm' or a local BERT-style model dir")
    lambda_grid: tuple[float, ...] = Field(
        (), description="λ tried on val (an extra row per method with a λ); (): none"
    )
    unit_scale: bool = Field(True, description="also report each λ-method at λ=1")
    learned_steps: int | None = Field(
        20, description="cap on the optimisation steps of learned merges; None: no cap"
    )
    continual_orders: int = Field(
        0, ge=0, description="task orders of the continual view (OPCM vs continual TA); 0: off"
    )
    eval_batch_size: int = 128
    device: str = "cpu"


PROFILES: dict[str, BenchConfig] = {
    "quick": BenchConfig(
        tasks=("rt_sentiment", "tweet_sentiment", "fortune_topic", "wordnet_supersense")
    ),
    "full": BenchConfig(
        tasks=TEXT_TASKS + VISION_TASKS,
        methods=None,
        train=FinetuneConfig(steps=200),
        # two seeds (three until 2026-12-08): with every method registered since and the LLM
        # suite after it, three put --full at ≈ 2:25 on the 2-core dev box (docs/bench.md)
        seeds=(0, 1),
        caps=(5000, 150, 500),
        max_len=40,
        image_size=64,
        lambda_grid=(0.1, 0.3, 0.6, 1.0, 1.5),
        learned_steps=50,
        continual_orders=1,
    ),
}


def _specs(cfg: BenchConfig) -> list[MergeSpec]:
    specs = merge_specs(cfg.methods, cfg.lambda_grid, cfg.learned_steps)
    if cfg.unit_scale:
        for spec in list(specs):
            plain = not (spec.tune or spec.params or spec.transform or spec.learned)
            scale = scale_param(methods.get(spec.method)) if plain else None
            if scale and scale[1] != 1.0:
                specs.insert(specs.index(spec) + 1, MergeSpec(spec.method, {scale[0]: 1.0}))
    return specs


@contextmanager
def _timed(phases: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[key] = phases.get(key, 0.0) + time.perf_counter() - start


@dataclass
class _Backbone:
    """One backbone's tasks, loaded and tokenized once for every seed."""

    encoder: Encoder
    data: dict[str, TaskData]
    val: dict[str, Prepared]
    test: dict[str, Prepared]


def load_backbone(cfg: Any, modality: str, tasks: Sequence[Any]) -> _Backbone:
    """One backbone and its tasks' splits (``cfg``: caps, seeds, sizes, model, device)."""
    data = {t.name: load_task(t, Caps(*cfg.caps), cfg.split_seed) for t in tasks}
    encoder = load_encoder(
        modality,
        text_model=cfg.text_model,
        max_len=cfg.max_len,
        image_size=cfg.image_size,
        device=cfg.device,
    )
    val = {n: encoder.prepare(d.val.x) for n, d in data.items()}
    test = {n: encoder.prepare(d.test.x) for n, d in data.items()}
    return _Backbone(encoder, data, val, test)


def _train_line(name: str, seed: int, run: TaskRun, cached: bool, steps: int) -> str:
    per100 = 100 * run.meta.get("train_s", float("nan")) / max(1, steps)
    if cached:
        return f"train {name} (seed {seed}): cached (trained in {per100:.1f} s per 100 steps)"
    loss = run.meta.get("final_loss", float("nan"))
    return f"train {name} (seed {seed}): {per100:.1f} s per 100 steps, final loss {loss:.3f}"


def run_bench(
    cfg: BenchConfig, console: Any | None = None, journal: Journal | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the results (see :mod:`splice.bench.report`).

    ``console`` (a rich Console) gets the estimate and a line per phase as it ends;
    ``journal`` keeps every finished row and supplies those of an interrupted run."""
    journal = journal if journal is not None else Journal(None, {})
    task_objs = [resolve_task(t) for t in cfg.tasks]
    specs = _specs(cfg)
    rows: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    continual: list[dict[str, Any]] = []
    runs_meta: list[dict[str, Any]] = []
    phases: dict[str, float] = {}
    modalities = sorted({t.modality for t in task_objs}, reverse=True)  # text first
    with Progress(console, time.perf_counter) as progress, _timed(phases, "wall_s"):
        with _timed(phases, "load_s"):
            groups = [
                load_backbone(cfg, m, [t for t in task_objs if t.modality == m]) for m in modalities
            ]
            rate = {g.encoder.modality: calibrate(g.encoder, g.val) for g in groups}
            cached = {
                f"train/{g.encoder.modality}/{seed}/{n}": is_cached(g.encoder, d, cfg.train, seed)
                for g in groups
                for seed in cfg.seeds
                for n, d in g.data.items()
            }
        plan = resumed(plan_run(cfg, specs, groups, rate, cached), journal)
        progress.plan(plan)
        phases["estimate_s"] = phases["load_s"] + sum(p.est for p in plan)
        progress.say(estimate_line(cfg, specs, plan, phases, rate))
        for g in groups:
            for seed in cfg.seeds:
                suite = Suite(g.encoder, g.data, g.val, g.test, batch_size=cfg.eval_batch_size)
                for name, d in g.data.items():
                    bar = progress.steps(f"train {name} (seed {seed})", cfg.train.steps)
                    with _timed(phases, "train_s"), bar as adv:
                        t0 = time.perf_counter()
                        run, was = finetune_cached(
                            g.encoder, d, cfg.train, seed, lambda s, loss, adv=adv: adv()
                        )
                    suite.runs[name] = run
                    runs_meta.append({"task": name, "seed": seed, "cached": was, **run.meta})
                    progress.done(
                        f"train/{g.encoder.modality}/{seed}/{name}",
                        _train_line(name, seed, run, was, cfg.train.steps),
                        time.perf_counter() - t0,
                    )
                with _timed(phases, "evaluate_s"):
                    evaluate_rows(suite, specs, rows, skipped, seed, progress, journal)
                if cfg.continual_orders and continual_methods(specs):
                    ind = {t: rows["individual"].acc[t][-1] for t in g.data}
                    with _timed(phases, "continual_s"):
                        t0 = time.perf_counter()
                        key = f"continual/{g.encoder.modality}/{seed}"
                        names = continual_methods(specs)
                        view = partial(run_continual, suite, names, cfg.continual_orders, seed, ind)
                        continual += journal.row(key, view)
                    progress.done(
                        f"continual/{g.encoder.modality}/{seed}",
                        f"continual view (seed {seed}): {', '.join(continual_methods(specs))}",
                        time.perf_counter() - t0,
                    )
    fresh = [r["train_s"] / cfg.train.steps * 100 for r in runs_meta if not r["cached"]]
    return {
        "config": cfg.model_dump(mode="json"),
        "tasks": {t.name: {"modality": t.modality, "about": t.description} for t in task_objs},
        "rows": [r.__dict__ for r in rows.values()],
        "skipped": skipped,
        "continual": continual,
        "runs": runs_meta,
        "meta": {
            **{k: round(v, 1) for k, v in phases.items()},
            "train_s_per_100_steps": round(float(np.mean(fresh)), 2) if fresh else None,
            "resumed_rows": journal.reused,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": cfg.device,
        },
    }


def profile_update(
    profiles: Mapping[str, Any],
    profile: str,
    suite: str | None,
    tasks: Sequence[str] | None,
    seed: int | None,
) -> tuple[Any, dict[str, Any]]:
    """A profile's config and the update of its tasks (``tasks``, else ``suite``'s tasks of
    the profile, else the whole suite) and seeds (shifted to start at ``seed``)."""
    from splice.errors import UsageError

    if profile not in profiles:
        raise UsageError(f"unknown profile {profile!r}", fix=f"choose from {sorted(profiles)}")
    cfg = profiles[profile]
    update: dict[str, Any] = {}
    if tasks:
        update["tasks"] = tuple(tasks)
    elif suite is not None:
        suites = {"text": TEXT_TASKS, "vision": VISION_TASKS, "all": TEXT_TASKS + VISION_TASKS}
        if suite not in suites:
            raise UsageError(f"unknown suite {suite!r}", fix="use text, vision or all")
        chosen = suites[suite]
        update["tasks"] = tuple(t for t in cfg.tasks if t in chosen) or chosen
    if seed is not None:
        update["seeds"] = tuple(seed + i for i in range(len(cfg.seeds)))
    return cfg, update


def configure(
    profile: str = "quick",
    *,
    suite: str | None = None,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    finetune: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    text_model: str | None = None,
) -> BenchConfig:
    """A profile's config with command-line overrides applied.

    ``suite`` picks the profile's text or vision tasks (quick runs text by default);
    ``methods`` replaces the profile's (``["all"]``: every registered method);
    ``seed`` shifts the profile's seeds to start at it.
    """

    cfg, update = profile_update(PROFILES, profile, suite, tasks, seed)
    if methods is not None:
        update["methods"] = None if list(methods) == ["all"] else tuple(methods)
    train = {k: v for k, v in {"finetune": finetune, "steps": steps}.items() if v is not None}
    if train:
        update["train"] = cfg.train.model_copy(update=train)
    for key, value in (("device", device), ("text_model", text_model)):
        if value is not None:
            update[key] = value
    return cfg.model_copy(update=update)
