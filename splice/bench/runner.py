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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from splice._schema import Strict
from splice.bench.continual import continual_methods, run_continual
from splice.bench.finetune import FinetuneConfig, Head, TaskRun, apply_deltas, finetune_cached
from splice.bench.merging import MergeSpec, merge_specs, merge_state, scale_param, unsupported
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


class BenchConfig(Strict):
    """Everything that defines a benchmark run (written into results.json).

    The defaults are the quick profile's settings.
    """

    tasks: tuple[str, ...] = Field(description="task names, or paths to CSV/JSONL/image folders")
    methods: tuple[str, ...] | None = Field(None, description="merge methods; None = all")
    train: FinetuneConfig = FinetuneConfig()
    seeds: tuple[int, ...] = (0,)
    caps: tuple[int, int, int] = Field((2000, 150, 400), description="train/val/test caps")
    split_seed: int = 0
    max_len: int = Field(32, description="text: tokens per example")
    image_size: int = Field(32, description="vision: input side in pixels")
    text_model: str = Field("minilm", description="'minilm' or a local BERT-style model dir")
    lambda_grid: tuple[float, ...] = Field((0.3, 0.6, 1.0, 1.5), description="λ tried on val")
    unit_scale: bool = Field(True, description="also report each λ-method at λ=1")
    learned_steps: int | None = Field(
        20, description="cap on the optimisation steps of learned merges; None: no cap"
    )
    continual_orders: int = Field(
        1, ge=0, description="task orders of the continual view (OPCM vs continual TA); 0: off"
    )
    eval_batch_size: int = 128
    device: str = "cpu"


PROFILES: dict[str, BenchConfig] = {
    "quick": BenchConfig(
        tasks=("rt_sentiment", "tweet_sentiment", "fortune_topic", "wordnet_supersense")
    ),
    "full": BenchConfig(
        tasks=TEXT_TASKS + VISION_TASKS,
        train=FinetuneConfig(steps=200),
        seeds=(0, 1, 2),
        caps=(5000, 150, 500),
        max_len=40,
        image_size=64,
        lambda_grid=(0.1, 0.3, 0.6, 1.0, 1.5),
        learned_steps=50,
        continual_orders=1,
    ),
}


@dataclass
class Row:
    """One line of the report: accuracies per task, one entry per seed."""

    key: str
    label: str
    kind: str  # "reference" (zero-shot, individual) or "merge"
    acc: dict[str, list[float]] = field(default_factory=dict)
    merge_s: list[float] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    tuned: str | None = None  # the parameter chosen on validation data, if any


class _Progress:
    """Rich progress bars, or nothing when no console is given."""

    def __init__(self, console: Any | None) -> None:
        self.bar = None
        if console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )

    def __enter__(self) -> _Progress:
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Any]:
        """Yields ``advance(n=1, description=None)``."""
        if self.bar is None:
            yield lambda *a, **k: None
            return
        tid = self.bar.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            self.bar.update(tid, advance=n, description=description or None)

        yield advance
        self.bar.update(tid, completed=total)


@torch.no_grad()
def _features(
    encoder: Encoder, data: Prepared, weights: Mapping[str, Tensor] | None, batch_size: int
) -> Tensor:
    device = next(encoder.module.parameters()).device
    order = data.eval_order()
    out = torch.empty(len(data), encoder.dim)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        out[torch.as_tensor(idx)] = encoder.features(data.batch(idx, device), weights).float().cpu()
    return out


def _accuracy(head: Head, feats: Tensor, labels: np.ndarray) -> float:
    pred = head(feats).argmax(-1).numpy()
    return float((pred == labels).mean())


@dataclass
class _Suite:
    """One backbone's tasks for one seed: data, prepared inputs, runs, base tensors."""

    encoder: Encoder
    data: dict[str, TaskData]
    val: dict[str, Prepared]
    test: dict[str, Prepared]
    runs: dict[str, TaskRun] = field(default_factory=dict)
    batch_size: int = 128

    def acc(
        self,
        weights: Mapping[str, Tensor] | None,
        split: str = "test",
        tasks: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Accuracy of one backbone weight set on ``tasks`` (all), each with its own head."""
        sets = self.test if split == "test" else self.val
        return {
            t: _accuracy(
                self.runs[t].head,
                _features(self.encoder, sets[t], weights, self.batch_size),
                getattr(self.data[t], split).y,
            )
            for t in (tasks or self.data)
        }


def _evaluate(
    suite: _Suite,
    specs: Sequence[MergeSpec],
    rows: dict[str, Row],
    skipped: dict[str, str],
    seed: int,
    progress: _Progress,
) -> None:
    tasks = list(suite.data)
    names = sorted({n for r in suite.runs.values() for n in r.deltas})
    state = suite.encoder.module.state_dict()
    base = {n: state[n] for n in names}
    own = {t: {**base, **apply_deltas(base, suite.runs[t].deltas)} for t in tasks}
    n_tune = sum(len(s.tune) for s in specs)
    total = 2 + len(specs) + n_tune + (1 if n_tune else 0)
    with progress.stage(f"evaluate (seed {seed})", total) as advance:
        advance(0, f"evaluate zero-shot (seed {seed})")
        _add(rows, "zero_shot", "zero-shot", "reference", suite.acc(None))
        advance()
        individual = {t: suite.acc(own[t], tasks=[t])[t] for t in tasks}  # own task only
        _add(rows, "individual", "individual", "reference", individual)
        advance()
        val_own = {t: suite.acc(own[t], "val", [t])[t] for t in tasks} if n_tune else {}
        advance(1 if n_tune else 0)
        models = list(own.values())
        tested: dict[str, tuple[dict[str, float], float]] = {}  # one test run per setting
        for spec in specs:
            reason = unsupported(spec, len(tasks))
            if reason:
                skipped[spec.label] = reason
                advance(1 + len(spec.tune))
                continue
            if spec.learned:
                advance(0, f"learn {spec.label} on val inputs")
                merged, secs = _learn(suite, spec, seed)
                _add(rows, spec.key, spec.label, "merge", suite.acc(merged), secs, spec.params)
                advance()
                continue
            chosen, best = spec, -1.0
            for value in spec.tune:
                advance(0, f"tune {spec.label}: {spec.tune_key}={value}")
                merged, _ = merge_state(spec.with_value(value), base, models, seed)
                val = suite.acc(merged, "val")
                score = float(np.mean([val[t] / max(val_own[t], 1e-9) for t in tasks]))
                if score > best:
                    chosen, best = spec.with_value(value), score
                advance()
            advance(0, f"evaluate {spec.label}")
            key = chosen.resolved_key()
            if key not in tested:
                merged, secs = merge_state(chosen, base, models, seed)
                tested[key] = suite.acc(merged), secs
            acc, secs = tested[key]
            _add(rows, spec.key, spec.label, "merge", acc, secs, chosen.chosen)
            rows[spec.key].tuned = spec.tune_key if spec.tune else None
            advance()
        advance(0, f"evaluated {len(specs) + 2} settings (seed {seed})")


def _learn(suite: _Suite, spec: MergeSpec, seed: int) -> tuple[dict[str, Tensor], float]:
    """Run a learned merge on the validation splits (labels only if it needs them)."""
    from splice.merge.learned import learned

    method = learned.get(spec.method)
    labeled = method.needs_labels(method.params(spec.params))
    data = {t: (suite.val[t], suite.data[t].val.y) if labeled else suite.val[t] for t in suite.data}
    encoder = suite.encoder
    start = time.perf_counter()
    out = method.run(
        encoder.module,
        {t: run.deltas for t, run in suite.runs.items()},
        data,
        params={**method.short, **spec.params},  # the method's short schedule, then the cap
        heads={t: run.head for t, run in suite.runs.items()},
        forward=lambda module, batch: encoder.features(batch, module=module),
        rows=(lambda b: b["attention_mask"]) if encoder.modality == "text" else None,
        seed=seed,
    )
    if method.continual:
        *_, out = out  # the model after the last task of the sequence
    return out.weights, time.perf_counter() - start


def _add(
    rows: dict[str, Row],
    key: str,
    label: str,
    kind: str,
    acc: Mapping[str, float],
    merge_s: float | None = None,
    params: Mapping[str, Any] | None = None,
) -> None:
    row = rows.setdefault(key, Row(key, label, kind))
    for t, a in acc.items():
        row.acc.setdefault(t, []).append(a)
    if merge_s is not None:
        row.merge_s.append(merge_s)
    if params is not None:
        row.params.append(dict(params))


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


def run_bench(cfg: BenchConfig, console: Any | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results (see :mod:`splice.bench.report`)."""
    start = time.perf_counter()
    caps = Caps(*cfg.caps)
    task_objs = [resolve_task(t) for t in cfg.tasks]
    specs = _specs(cfg)
    rows: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    continual: list[dict[str, Any]] = []
    runs_meta: list[dict[str, Any]] = []
    phases: dict[str, float] = {}
    modalities = sorted({t.modality for t in task_objs}, reverse=True)  # text first
    with _Progress(console) as progress:
        for modality in modalities:
            group = [t for t in task_objs if t.modality == modality]
            with _timed(phases, "load_s"):
                data = {t.name: load_task(t, caps, cfg.split_seed) for t in group}
                encoder = load_encoder(
                    modality,
                    text_model=cfg.text_model,
                    max_len=cfg.max_len,
                    image_size=cfg.image_size,
                    device=cfg.device,
                )
                val = {n: encoder.prepare(d.val.x) for n, d in data.items()}
                test = {n: encoder.prepare(d.test.x) for n, d in data.items()}
            for seed in cfg.seeds:
                suite = _Suite(encoder, data, val, test, batch_size=cfg.eval_batch_size)
                for name, d in data.items():
                    stage = progress.stage(f"train {name} (seed {seed})", cfg.train.steps)
                    with _timed(phases, "train_s"), stage as adv:
                        run, cached = finetune_cached(
                            encoder, d, cfg.train, seed, lambda s, loss, adv=adv: adv()
                        )
                    suite.runs[name] = run
                    runs_meta.append({"task": name, "seed": seed, "cached": cached, **run.meta})
                with _timed(phases, "evaluate_s"):
                    _evaluate(suite, specs, rows, skipped, seed, progress)
                if cfg.continual_orders and continual_methods(specs):
                    ind = {t: rows["individual"].acc[t][-1] for t in data}
                    stage = progress.stage(f"continual view (seed {seed})", 1)
                    with _timed(phases, "continual_s"), stage as adv:
                        continual += run_continual(
                            suite, continual_methods(specs), cfg.continual_orders, seed, ind
                        )
                        adv()
    return {
        "config": cfg.model_dump(mode="json"),
        "tasks": {t.name: {"modality": t.modality, "about": t.description} for t in task_objs},
        "rows": [r.__dict__ for r in rows.values()],
        "skipped": skipped,
        "continual": continual,
        "runs": runs_meta,
        "meta": {
            "wall_s": round(time.perf_counter() - start, 1),
            **{k: round(v, 1) for k, v in phases.items()},
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": cfg.device,
        },
    }


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
) -> BenchConfig:
    """A profile's config with command-line overrides applied.

    ``suite`` picks the profile's text or vision tasks (quick runs text by default);
    ``seed`` shifts the profile's seeds to start at it.
    """
    from splice.errors import UsageError

    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}", fix=f"choose from {sorted(PROFILES)}")
    cfg = PROFILES[profile]
    update: dict[str, Any] = {}
    if tasks:
        update["tasks"] = tuple(tasks)
    elif suite is not None:
        suites = {"text": TEXT_TASKS, "vision": VISION_TASKS, "all": TEXT_TASKS + VISION_TASKS}
        if suite not in suites:
            raise UsageError(f"unknown suite {suite!r}", fix="use text, vision or all")
        chosen = suites[suite]
        in_profile = tuple(t for t in cfg.tasks if t in chosen)
        update["tasks"] = in_profile or chosen
    if methods is not None:
        update["methods"] = tuple(methods)
    train = {k: v for k, v in {"finetune": finetune, "steps": steps}.items() if v is not None}
    if train:
        update["train"] = cfg.train.model_copy(update=train)
    if seed is not None:
        update["seeds"] = tuple(seed + i for i in range(len(cfg.seeds)))
    if device is not None:
        update["device"] = device
    return cfg.model_copy(update=update)
