"""``splice bench --protocol paper``: the merging papers' protocol (fusionbench.md §3, FB).

Every task is fully fine-tuned (all weights, per-task schedule: :mod:`splice.bench.per_task`)
with its own head; each merged model is scored on every task's test split with that task's
head, and *normalized accuracy* is merged / fine-tuned accuracy per task, averaged. Rows:

- references: zero-shot (pretrained backbone, task heads) and the individual fine-tunes;
- one dense merged model each: weight averaging, task arithmetic and TIES at FusionBench's
  fixed λ = 0.3 and with λ tuned on the validation splits, and the data-driven merges fitted
  on the validation inputs (Fisher, RegMean, RegMean++, layer-wise AdaMerging);
- not one dense model (:mod:`splice.bench.paper_rows`): EMR-Merging (a rebuilt model per
  task) and WEMoE (routed feed-forward blocks; routers trained on the validation labels);
- **transductive** (marked so in every report, in a table of their own): AdaMerging and
  Concrete fitted on the unlabeled *test* inputs, and WEMoE with routers trained by entropy on
  them, as the papers do.

:func:`estimate` gives the predicted wall time of a profile on this machine without running
it (the cost model of :mod:`splice.bench.plan`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from pydantic import Field

from splice._schema import Strict
from splice.bench.finetune import FinetuneConfig
from splice.bench.journal import Journal
from splice.bench.merging import MergeSpec, scale_param
from splice.bench.progress import Phase

__all__ = ["PAPER_PROFILES", "PaperConfig", "configure_paper", "estimate", "run_paper"]

QUICK_TEXT = ("rt_sentiment", "tweet_sentiment", "fortune_topic", "wordnet_supersense")
# Dense merges, then the data-driven ones (fitted on validation inputs).
DENSE = ("linear", "task_arithmetic", "ties")
LEARNED = ("fisher", "regmean", "regmean_plusplus", "adamerging")


class WEMoESettings(Strict):
    """Router training of the WEMoE rows (Adam on the routers only)."""

    steps: int = Field(30, ge=1, description="router steps")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="examples per task and step")
    inductive: bool = Field(True, description="a row with routers trained by CE on val labels")
    transductive: bool = Field(True, description="a row with entropy on the test inputs")


class PaperConfig(Strict):
    """Everything that defines a paper-protocol run (written into results.json)."""

    tasks: tuple[str, ...]
    train: FinetuneConfig = FinetuneConfig(finetune="full")
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task -> FinetuneConfig overrides"
    )
    methods: tuple[str, ...] = DENSE + LEARNED
    fixed_lambda: float = Field(0.3, description="FusionBench's untuned λ")
    lambda_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    schedules: dict[str, Any] = Field(
        default_factory=lambda: {"adamerging": "short", "concrete": "short"},
        description="learned method -> 'paper' | 'short' | overrides (both inductive and "
        "transductive rows)",
    )
    transductive: tuple[str, ...] = ("adamerging",)
    variants: dict[str, tuple[dict[str, Any], ...]] = Field(
        default_factory=lambda: {"ties": ({}, {"aggregate": "sum"})},
        description="method -> one row group per parameter set ({}: the method's defaults); "
        "TIES twice: splice's disjoint mean (the paper's text) and the disjoint sum of the "
        "reference code and FusionBench (merge_func 'dis-sum' / 'sum'), whose λ = 0.3 the "
        "published tables use",
    )
    emr: bool = True
    bn_repair: tuple[str, ...] = Field(
        ("linear", "task_arithmetic", "ties", "regmean", "adamerging", "emr"),
        description="methods that also get a batch-norm-repaired row (backbones with batch "
        "norm; λ then tuned on val with the repair)",
    )
    repair_params: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"adamerging": {"bn": "batch"}},
        description="method -> parameters of its repaired row only (AdaMerging then fits its "
        "coefficients with batch statistics, since the stored ones are replaced after)",
    )
    wemoe: WEMoESettings | None = WEMoESettings()
    seeds: tuple[int, ...] = (0,)
    caps: tuple[int, int, int] = (2000, 150, 400)
    split_seed: int = 0
    max_len: int = 32
    image_size: int = 32
    text_model: str = "minilm"
    eval_batch_size: int = 128
    device: str = "cpu"


# quick: sized to stay under ~30 min per suite on a busy 2-core box (text: 4 full MiniLM
# fine-tunes, the WEMoE rows at 20 router steps; vision about 5 min); full: the whole suites
# at the papers' step counts (AdaMerging 500, Concrete 2000 + 1000), one seed.
PAPER_PROFILES: dict[str, PaperConfig] = {
    "quick": PaperConfig(
        tasks=QUICK_TEXT,
        lambda_grid=(0.1, 0.3, 0.5, 1.0),
        schedules={"adamerging": {"steps": 50, "lr": 1e-2, "batches_per_step": 1}},
        wemoe=WEMoESettings(steps=20, batch_size=8),
    ),
    "full": PaperConfig(
        tasks=(
            "rt_sentiment",
            "subjectivity",
            "tweet_sentiment",
            "fortune_topic",
            "wordnet_supersense",
            "convention_party",
            "fashion_mnist",
            "mnist_5k",
            "animal_mnist",
            "sk_digits",
        ),
        train=FinetuneConfig(finetune="full", steps=200),
        schedules={"adamerging": "paper", "concrete": "paper"},
        transductive=("adamerging", "concrete"),
        wemoe=WEMoESettings(steps=100),
        caps=(5000, 150, 500),
        max_len=40,
        image_size=64,
    ),
}


def configure_paper(
    profile: str = "quick",
    *,
    suite: str | None = None,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    text_model: str | None = None,
    per_task: Mapping[str, Mapping[str, Any]] | None = None,
) -> PaperConfig:
    """A paper profile with command-line overrides (as :func:`splice.bench.runner.configure`;
    ``per_task``: ``{task: FinetuneConfig overrides}``, checked against the tasks)."""
    from splice.bench.per_task import task_configs
    from splice.bench.runner import profile_update

    cfg, update = profile_update(PAPER_PROFILES, profile, suite, tasks, seed)
    if methods is not None:
        update["methods"] = tuple(methods)
    if steps is not None:
        update["train"] = cfg.train.model_copy(update={"steps": steps})
    for key, value in (("device", device), ("text_model", text_model)):
        if value is not None:
            update[key] = value
    if per_task:
        update["per_task"] = {t: dict(v) for t, v in per_task.items()}
    cfg = cfg.model_copy(update=update)
    task_configs([_name(t) for t in cfg.tasks], cfg.train, cfg.per_task)  # refuse bad ones now
    return cfg


def _name(task: str) -> str:
    from splice.data.local import resolve_task

    return resolve_task(task).name


def paper_specs(cfg: PaperConfig) -> list[MergeSpec]:
    """The dense rows: each method with a λ at ``fixed_lambda`` and tuned on val; learned
    methods on their schedule; others at their defaults."""
    from splice.bench.merging import PRESETS
    from splice.bench.per_task import schedule_params
    from splice.merge.base import methods
    from splice.merge.learned import learned

    out, repaired = [], []
    for name in cfg.methods:
        if name in learned.names():
            sched = cfg.schedules.get(name, "short")
            out.append(MergeSpec(name, schedule_params(name, sched), learned=True))
            if name in cfg.bn_repair:
                params = {**out[-1].params, **cfg.repair_params.get(name, {})}
                repaired.append(dataclasses.replace(out[-1], params=params, repair_bn=True))
            continue
        scale = scale_param(methods.get(name))
        preset = PRESETS.get(name, {})
        rest = {k: v for k, v in preset.items() if k != "params"}
        for variant in cfg.variants.get(name, ({},)):
            spec = MergeSpec(name, {**preset.get("params", {}), **variant}, **rest)
            if scale is None:
                out.append(spec)
            else:
                fixed = {**spec.params, scale[0]: cfg.fixed_lambda}
                out.append(dataclasses.replace(spec, params=fixed))
                if cfg.lambda_grid:
                    out.append(dataclasses.replace(spec, tune=cfg.lambda_grid, tune_key=scale[0]))
            if name in cfg.bn_repair:  # the variant's last (tuned) setting, repaired
                repaired.append(dataclasses.replace(out[-1], repair_bn=True))
    return out + repaired


def transductive_specs(cfg: PaperConfig) -> list[MergeSpec]:
    from splice.bench.per_task import schedule_params

    return [
        MergeSpec(m, schedule_params(m, cfg.schedules.get(m, "short")), learned=True)
        for m in cfg.transductive
    ]


# Extra rows' cost in forward-pass examples: WEMoE runs each routed block once per sample
# (measured ≈ 6× the dense pass on MiniLM), its router steps are forward + backward.
_WEMOE_SLOWDOWN = 6.0


def _plan(
    cfg: PaperConfig, groups: Sequence[Any], rate: Mapping[str, float], configs: Mapping
) -> list[Phase]:
    from splice.bench.finetune import is_cached
    from splice.bench.plan import FACTORS, _learned_s, plan_run
    from splice.bench.runner import BenchConfig

    bench = BenchConfig(tasks=cfg.tasks, methods=(), train=cfg.train, seeds=cfg.seeds,
                        unit_scale=False)  # fmt: skip
    cached = {f"train/{g.encoder.modality}/{s}/{n}": True
              for g in groups for s in cfg.seeds for n in g.data}  # fmt: skip
    phases = plan_run(bench, paper_specs(cfg), groups, rate, cached)
    trans = transductive_specs(cfg)
    for g in groups:
        mod = g.encoder.modality
        evaluate, train = FACTORS.get(mod, (1.0, 3.0))
        t = rate[mod] * evaluate
        n_test = sum(len(p) for p in g.test.values())
        n_tasks = len(g.data)
        for seed in cfg.seeds:
            at = f"{mod}/{seed}"
            for name, d in g.data.items():
                c = configs[name]
                key = f"train/{at}/{name}"
                cost = c.steps * c.batch_size * train * rate[mod]
                cached_run = is_cached(g.encoder, d, c, seed)
                phases = [Phase(key, "train", 0.0 if cached_run else cost) if p.key == key else p
                          for p in phases]  # fmt: skip
            if cfg.emr:
                phases.append(Phase(f"evaluate/{at}/emr", "evaluate", n_test * t))
            if cfg.emr and "emr" in cfg.bn_repair:
                phases.append(Phase(f"evaluate/{at}/emr+bn", "evaluate", 2 * n_test * t))
            if cfg.wemoe is not None and mod == "text":
                w = cfg.wemoe
                one = (w.steps * w.batch_size * n_tasks * train + n_test * 2) * rate[mod]
                for kind in ("inductive", "transductive"):
                    if getattr(w, kind):
                        phases.append(
                            Phase(f"evaluate/{at}/wemoe-{kind}", "evaluate", one * _WEMOE_SLOWDOWN)
                        )
            for spec in trans:
                est = _learned_s(spec, n_test, n_tasks, t) + n_test * t
                phases.append(Phase(f"evaluate/{at}/{spec.key}@test", "evaluate", est))
    return phases


def _load(cfg: PaperConfig) -> tuple[list[Any], dict[str, float], dict[str, FinetuneConfig]]:
    from splice.bench.per_task import task_configs
    from splice.bench.plan import calibrate
    from splice.bench.runner import load_backbone
    from splice.data.local import resolve_task

    task_objs = [resolve_task(t) for t in cfg.tasks]
    modalities = sorted({t.modality for t in task_objs}, reverse=True)  # text first
    groups = [load_backbone(cfg, m, [t for t in task_objs if t.modality == m]) for m in modalities]
    rate = {g.encoder.modality: calibrate(g.encoder, g.val) for g in groups}
    configs = task_configs([t.name for t in task_objs], cfg.train, cfg.per_task)
    return groups, rate, configs


def estimate(cfg: PaperConfig) -> tuple[float, list[Phase]]:
    """Predicted seconds of a run of ``cfg`` on this machine (loading included) and its
    phases; loads the data and times a few forward passes, runs nothing else."""
    start = time.perf_counter()
    groups, rate, configs = _load(cfg)
    plan = _plan(cfg, groups, rate, configs)
    return time.perf_counter() - start + sum(p.est for p in plan), plan


def estimate_text(cfg: PaperConfig, seconds: float, plan: Sequence[Phase]) -> str:
    from splice.bench.progress import clock

    by = {k: sum(p.est for p in plan if p.kind == k) for k in ("train", "evaluate")}
    return (
        f"estimate {clock(seconds)} on this machine ({seconds / 3600:.1f} h): "
        f"{len(cfg.tasks)} tasks × {len(cfg.seeds)} seed(s), {len(plan)} phases; "
        f"training {clock(by['train'])}, evaluation and merges {clock(by['evaluate'])}"
    )


def run_paper(
    cfg: PaperConfig, console: Any | None = None, journal: Journal | None = None
) -> dict[str, Any]:
    """Run the paper protocol; the results have the shape of :func:`splice.bench.run_bench`'s
    plus ``extra`` (per row: extra parameters, evaluation-time factor) and rows of kind
    ``per-task`` (EMR), ``routed`` (WEMoE) and ``transductive``. ``journal`` keeps every
    finished row and supplies those of an interrupted run (as in ``run_bench``)."""
    import platform

    import torch

    from splice.bench.finetune import finetune_cached
    from splice.bench.progress import Progress
    from splice.bench.rows import Row, evaluate_rows, resumed
    from splice.bench.runner import _train_line
    from splice.bench.suite import Suite

    rows: dict[str, Row] = {}
    extra: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    runs_meta: list[dict[str, Any]] = []
    journal = journal if journal is not None else Journal(None, {})
    start = time.perf_counter()
    with Progress(console, time.perf_counter) as progress:
        groups, rate, configs = _load(cfg)
        plan = resumed(_plan(cfg, groups, rate, configs), journal)
        progress.plan(plan)
        est = time.perf_counter() - start + sum(p.est for p in plan)
        progress.say(estimate_text(cfg, est, plan))
        specs, trans = paper_specs(cfg), transductive_specs(cfg)
        for g in groups:
            mod = g.encoder.modality
            for seed in cfg.seeds:
                at = f"{mod}/{seed}"
                suite = Suite(g.encoder, g.data, g.val, g.test, batch_size=cfg.eval_batch_size)
                for name, d in g.data.items():
                    c = configs[name]
                    t0 = time.perf_counter()
                    with progress.steps(f"train {name} (seed {seed})", c.steps) as adv:
                        run, was = finetune_cached(
                            g.encoder, d, c, seed, lambda s, loss, adv=adv: adv()
                        )
                    suite.runs[name] = run
                    runs_meta.append(
                        {"task": name, "seed": seed, "cached": was, "steps": c.steps, **run.meta}
                    )
                    line = _train_line(name, seed, run, was, c.steps)
                    progress.done(f"train/{at}/{name}", line, time.perf_counter() - t0)
                evaluate_rows(suite, specs, rows, skipped, seed, progress, journal)
                _extra_rows(cfg, suite, seed, trans, rows, extra, skipped, progress, journal)
    wall = time.perf_counter() - start
    return {
        "protocol": "paper",
        "config": cfg.model_dump(mode="json"),
        "tasks": {n: {"modality": g.encoder.modality} for g in groups for n in g.data},
        "rows": [r.__dict__ for r in rows.values()],
        "extra": extra,
        "skipped": skipped,
        "continual": [],
        "runs": runs_meta,
        "meta": {
            "wall_s": round(wall, 1),
            "estimate_s": round(est, 1),
            "resumed_rows": journal.reused,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": cfg.device,
        },
    }


def _extra_rows(
    cfg: PaperConfig,
    suite: Any,
    seed: int,
    trans: Sequence[MergeSpec],
    rows: dict[str, Any],
    extra: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    progress: Any,
    journal: Journal,
) -> None:
    """EMR, WEMoE and the transductive rows of one (backbone, seed); a row that cannot run
    (WEMoE without feed-forward blocks) is listed as not run, with the reason. Rows in
    ``journal`` are read from it, the others added to it."""
    from splice.bench.paper_rows import emr_row, transductive_row, wemoe_row
    from splice.bench.rows import add_row
    from splice.errors import SpliceError

    mod = suite.encoder.modality
    at = f"{mod}/{seed}"
    todo: list[tuple[str, str, str, Any]] = []
    if cfg.emr:
        todo.append(("emr", "EMR-Merging (a model per task)", "per-task", lambda: emr_row(suite)))
    if cfg.emr and "emr" in cfg.bn_repair:
        todo.append(("emr+bn", "EMR-Merging + BN repair (a model per task)", "per-task",
                     lambda: emr_row(suite, repair_bn=True)))  # fmt: skip
    w = cfg.wemoe
    if w is not None and mod == "text":
        kw = {"steps": w.steps, "lr": w.lr, "batch_size": w.batch_size, "seed": seed}
        if w.inductive:
            todo.append(("wemoe-inductive", "WEMoE · routers CE on val labels", "routed",
                         lambda: wemoe_row(suite, "ce", **kw)))  # fmt: skip
        if w.transductive:
            todo.append(("wemoe-transductive",
                         "WEMoE · routers entropy on test inputs (transductive)", "transductive",
                         lambda: wemoe_row(suite, "entropy", **kw)))  # fmt: skip
    for spec in trans:
        label = f"{spec.label} · test inputs (transductive)"
        make = partial(transductive_row, suite, spec, seed)
        todo.append((f"{spec.key}@test", label, "transductive", make))

    def outcome(make: Callable[[], Any]) -> dict[str, Any]:
        try:
            acc, more, secs = make()
        except SpliceError as e:
            return {"skip": str(e)}
        return {"acc": acc, "more": more, "secs": secs}

    for key, label, kind, make in todo:
        t0 = time.perf_counter()
        row = journal.row(f"evaluate/{at}/{key}", partial(outcome, make))
        if "skip" in row:
            skipped[label] = row["skip"]
            progress.done(f"evaluate/{at}/{key}", f"skip {label}: {row['skip']}", 0.0)
            continue
        acc = row["acc"]
        add_row(rows, key, label, kind, acc, row["secs"], {})
        extra.setdefault(key, {}).update(row["more"])
        mean = float(np.mean(list(acc.values())))
        took = time.perf_counter() - t0
        progress.done(f"evaluate/{at}/{key}", f"evaluate {label}: {mean:.1%}", took)
