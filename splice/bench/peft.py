"""The PEFT track of ``splice bench``: every registered adapter method, one protocol, one table.

Rows, per backbone (text tasks on MiniLM-L6, image tasks on EfficientNet-Lite0): the *linear
probe* (backbone frozen, only the head trains), every method of :data:`splice.adapters.METHODS`
(one registered later gets its row with no edit here) at its registered defaults (or
``options``, or sized to ``budget``), and *full fine-tuning*.
A method whose layer kinds the backbone's targets lack (EPT: linear layers only, on the conv
net) gets a "not applicable" row with the reason; one that raises gets an error row.

The protocol (:data:`PROTOCOL`, printed with every report), per task:

1. the head's lr is the linear probe's, chosen on the validation split from
   ``head_lr_grid`` at the first seed; every other row trains its head at that lr;
2. each row's lr is chosen on the validation split at the first seed from ``lr_grid``
   (full fine-tuning: ``full_lr_grid``); ties go to the smaller lr; a pick on an edge of
   the grid grows it by one 1-2-5 step past that edge, at most ``grow`` times; a method's
   ``search`` options (R-AMT's (init, τ), at lrs where its ``pace`` stays within its own
   values') are picked with the lr on validation averaged over two seeds (ties: lower loss);
3. the picked run is scored once on test and re-trained at the other seeds; test picks nothing.

Training is :func:`splice.bench.finetune.train` (the one loop); each row's outcome is cached by
(model, splits, row, options, protocol), so a re-run repeats the numbers at no cost. The probes
run first, in this process; the other rows in ``workers`` forked processes
(:mod:`splice.bench.peft_pool`), each on one torch thread: the numbers do not depend on it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from splice._schema import Strict
from splice.bench.peft_budget import fit_budget
from splice.bench.peft_pool import Job, PoolProgress, makespan, run_job, run_jobs, workers_for
from splice.bench.peft_rows import Task, search_key, search_values, start_row
from splice.bench.peft_select import SELECTOR_ROWS, selector_plans
from splice.bench.plan import FACTORS, calibrate
from splice.bench.progress import Phase, clock
from splice.bench.runner import load_backbone, profile_update
from splice.data.cache import cache_root, stable_hash
from splice.errors import SpliceError, UsageError

__all__ = ["PEFT_PROFILES", "PROTOCOL", "PeftConfig", "configure_peft", "method_update", "run_peft"]

PROTOCOL = (
    "Per task: the head's lr is the linear probe's, picked on the validation split (first "
    "seed) from the head grid, and every row trains its head at it. Each row's lr is picked on "
    "the validation split (first seed) from the lr grid (full fine-tuning: its own grid); ties "
    "go to the smaller lr; a pick on a grid edge grows the grid one 1-2-5 step past it, at "
    "most `grow` times. A method that declares options to search (R-AMT: (init, τ) and both "
    "halved, at the lrs where K stays within its own values' Ks) has them picked with the lr "
    "on validation averaged over the first two seeds, ties to the lower validation loss, then "
    "its own values. The picked run is scored once on the test split (at each seed it was "
    "trained at) and re-trained at the other seeds; the test split plays no part in any choice."
)
REFERENCES = ("probe", "full")
# a full fine-tuning step against an adapter's (quick profile on the dev box: 2.7x LoRA's on
# MiniLM, 1.9x on EfficientNet-Lite0), and what the rows cost beyond the examples they pass
# (a model copy, adapter injection, the saved file; some methods' heavier steps)
_FULL_COST = 2.5
_SLACK = 1.1
# rows whose runs cost more than their examples say: a row's seconds over LoRA's (quick profile,
# idle dev box, 2026-12-07): R-AMT's teacher pass per step 2.1x (text; 2.9x on the digits), SPT's
# sensitivity pass per run 1.8x, prompt and P-tuning's virtual tokens 1.7x, ID3's entry masks
# 1.8x; so the longest rows start first and the tail is short
_ROW_COST = {"ramt": 2.2, "spt": 1.8, "id3": 1.8, "prompt": 1.7, "ptuning": 1.7}


class PeftConfig(Strict):
    """Everything that defines a PEFT-track run (written into results.json)."""

    tasks: tuple[str, ...] = Field(description="task names, or paths to CSV/JSONL/image folders")
    methods: tuple[str, ...] | None = Field(None, description="adapter methods; None = all")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per method: options replacing its defaults"
    )
    budget: int | None = Field(None, gt=0, description="size every method to ~N parameters")
    steps: int = 40
    suite_steps: dict[str, int] = Field(
        default_factory=dict, description="per suite (text, image): steps replacing `steps`"
    )
    batch_size: int = 16
    lr_grid: tuple[float, ...] = (1e-3, 5e-3)
    full_lr_grid: tuple[float, ...] = (5e-5,)
    head_lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    grow: int = Field(0, ge=0, description="grid extensions past an edge pick, at most")
    seeds: tuple[int, ...] = (0,)
    caps: tuple[int, int, int] = Field((1000, 150, 400), description="train/val/test caps")
    split_seed: int = 0
    max_len: int = 32
    image_size: int = 32
    text_model: str = "minilm"
    eval_batch_size: int = Field(32, description="length-sorted: smaller pads less")
    device: str = "cpu"
    workers: int = Field(2, ge=1, description="rows at once (processes of one torch thread)")


PEFT_PROFILES: dict[str, PeftConfig] = {
    # every registered method in minutes (docs/bench.md "PEFT track"): the suite's shortest
    # text inputs (glosses cut at 16 tokens; 25 classes leave room above the probe), 20 steps
    # of 8 on the text and 32 on the digits (cheaper per example; at 24 their LoRA row stays
    # at the probe's accuracy), capped validation and test splits
    "quick": PeftConfig(
        tasks=("wordnet_supersense", "sk_digits"),
        steps=20,
        suite_steps={"image": 32},
        batch_size=8,
        caps=(1000, 100, 200),
        max_len=16,
    ),
    # the same tasks with 2.7x the training per run, larger splits and three seeds (the
    # extra seeds at the picked lr only), sized to 90 minutes on the slowest 2-core box
    "full": PeftConfig(
        tasks=("wordnet_supersense", "sk_digits"),
        steps=32,
        batch_size=16,
        lr_grid=(1e-3, 5e-3),
        full_lr_grid=(5e-5, 1e-4),
        seeds=(0, 1, 2),
        caps=(2000, 200, 400),
        max_len=24,
    ),
}


def configure_peft(
    profile: str = "quick",
    *,
    suite: str | None = None,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
    budget: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | None = None,
    text_model: str | None = None,
    workers: int | None = None,
    grow: int | None = None,
) -> PeftConfig:
    """A profile's config with command-line overrides (as :func:`splice.bench.runner.configure`)."""
    cfg, update = profile_update(PEFT_PROFILES, profile, suite, tasks, seed)
    update |= method_update(methods, options)
    values = {"steps": steps, "budget": budget, "device": device, "text_model": text_model,
              "workers": workers, "grow": grow}  # fmt: skip
    update |= {k: v for k, v in values.items() if v is not None}
    if steps is not None:  # --steps sets every suite's
        update["suite_steps"] = {}
    return PeftConfig.model_validate(cfg.model_dump() | update)


def _suite_config(cfg: PeftConfig, modality: str) -> PeftConfig:
    """``cfg`` as one suite runs it: its ``suite_steps`` entry, if any, as ``steps``."""
    steps = cfg.suite_steps.get(modality, cfg.steps)
    return cfg if steps == cfg.steps else cfg.model_copy(update={"steps": steps})


def method_update(
    methods: Sequence[str] | None, options: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """The config update for ``--methods`` (``["all"]``: none) and ``--set``; an unknown
    method or option fails here, with a "did you mean", not mid-run."""
    from splice.adapters import METHODS
    from splice.adapters.inject import _config

    update: dict[str, Any] = {}
    if methods is not None and list(methods) != ["all"]:
        for name in methods:
            if name not in SELECTOR_ROWS:
                METHODS.get(name)  # an unknown name fails here, with a "did you mean"
        update["methods"] = tuple(methods)
    for name, values in (options or {}).items():
        values = dict(values)
        targets = values.pop("targets", None)  # the row's, instead of the backbone's
        if targets is not None and not (
            isinstance(targets, list | tuple)
            and targets
            and all(isinstance(t, str) for t in targets)
        ):
            fix = f"""e.g. --set '{name}.targets=["query","key","value"]'"""
            raise UsageError(f"{name}.targets={targets!r} is not a list of module names", fix=fix)
        _config(METHODS.get(name), name, values)
    if options:
        update["options"] = {k: dict(v) for k, v in options.items()}
    return update


def run_meta(t0: float, load_s: float, estimate_s: float, device: str) -> dict[str, Any]:
    """The run's ``meta``: wall time since ``t0``, estimate, load time, versions, threads."""
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "estimate_s": round(estimate_s, 1),
        "load_s": round(load_s, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device,
    }


# Rows ------------------------------------------------------------------------------------------


def _row_plans(cfg: PeftConfig, encoder: Any) -> list[dict[str, Any]]:
    """Every row of one backbone: key, kind, family, options (sized), or why it cannot run."""
    from splice.adapters import METHODS, for_run
    from splice.adapters.inject import find_sites

    found = find_sites(encoder.module, list(encoder.default_targets))
    sites = [site for _, _, site in found]
    kinds = sorted({s.kind for s in sites})
    names = list(cfg.methods) if cfg.methods is not None else METHODS.names()
    # a method that a selector configures (sparse) is trained by its selectors' rows (all
    # selector rows when every method runs), after the other methods
    wanted = {*names} if cfg.methods is not None else {*names, *SELECTOR_ROWS}
    for n in [n for n in names if n not in SELECTOR_ROWS]:
        wanted.update(METHODS.get(n).selected_by)
    selectors = [k for k in SELECTOR_ROWS if k in wanted]
    names = [n for n in names if n not in SELECTOR_ROWS and not METHODS.get(n).selected_by]
    plans = [{"key": "probe", "label": "linear probe", "kind": "reference", "family": "–"}]
    for name in names:
        cls, options = METHODS.get(name), dict(cfg.options.get(name, {}))
        targets = options.pop("targets", None)  # --set METHOD.targets=[...]
        plan: dict[str, Any] = {
            "key": name,
            "label": getattr(cls, "pretty_name", name),
            "kind": "adapter",
            "family": getattr(cls, "family", "undeclared"),
            "options": for_run(name, options, cfg.steps),
            **({"targets": list(targets)} if targets else {}),
        }
        own = _own_sites(cls, encoder, plan["options"], targets)
        matched = own is None  # the method adapts the layers the targets match
        if matched and targets:
            own = _matched(encoder.module, targets)  # its sites, or why none match
        mine = sorted({s.kind for s in own}) if isinstance(own, list) else kinds
        missing = [k for k in mine if k not in cls.kinds] if matched else []
        if isinstance(own, str):  # where the method's sites are found: none on this backbone
            plan["reason"] = f"{name} does not apply to {type(encoder.module).__name__}: {own}"
        elif missing:
            plan["reason"] = (
                f"{name} adapts {', '.join(sorted(cls.kinds))} layers; "
                f"{type(encoder.module).__name__}'s targets are {', '.join(missing)}"
            )
        elif cfg.budget is not None:
            try:
                sizing = fit_budget(cls, own or sites, plan["options"], cfg.budget)
            except Exception as e:  # a method whose formula or config fails: its error row
                plan["error"] = f"{type(e).__name__}: {e}"
                sizing = None
            if sizing is not None:
                plan["options"] = sizing.options
                plan["budget"] = {"count": sizing.count, "step": sizing.step,
                                  "knob": list(sizing.knob), "floor": sizing.floor}  # fmt: skip
        plans.append(plan | {"search": s} if (s := search_values(cls, plan["options"])) else plan)
    if selectors:
        plans += selector_plans(selectors, encoder, *_lora_budget(cfg, sites))
    plans.append({"key": "full", "label": "full fine-tune", "kind": "reference", "family": "–"})
    return plans


def _lora_budget(cfg: PeftConfig, sites: list) -> tuple[dict[str, Any], int]:
    """The LoRA row's options and trainable count: the selector rows' budget (or ``--budget``)."""
    from splice.adapters import METHODS
    from splice.adapters.inject import _config

    lora, options = METHODS.get("lora"), dict(cfg.options.get("lora", {}))
    if cfg.budget is not None:
        sizing = fit_budget(lora, sites, options, cfg.budget)
        options = sizing.options if sizing is not None else options
    count = lora().num_parameters(sites, _config(lora, "lora", options))
    return options, cfg.budget or count


def _own_sites(
    cls: Any, encoder: Any, options: dict[str, Any], targets: Any = None
) -> list | str | None:
    """The sites of a method that finds its own (prefix: attention modules; parallel adapter:
    sublayer outputs) near ``targets`` (default: the backbone's), the reason it finds none,
    or None."""
    from splice.adapters.inject import _config

    impl = cls()
    try:
        found = impl.find(encoder.module, list(targets or encoder.default_targets), None,
                          _config(cls, cls.__name__, options))  # fmt: skip
    except SpliceError as e:
        return str(e)
    return None if found is None else [site for _, _, site in found]


def _matched(module: Any, targets: Sequence[str]) -> list | str:
    from splice.adapters.inject import find_sites

    try:
        return [site for _, _, site in find_sites(module, list(targets))]
    except SpliceError as e:
        return str(e)


def _row_path(cfg: PeftConfig, group: Any, task: str, plan: dict) -> Path:
    """The row's cache entry: (model, splits, row, options, protocol); the head lr is the
    probe's pick, a function of the same inputs."""
    fields = ("steps", "batch_size", "lr_grid", "full_lr_grid", "head_lr_grid", "grow", "seeds")
    key = stable_hash(
        {
            "v": 1,
            "model": group.encoder.key,
            "data": group.data[task].key,
            "row": plan["key"],
            "options": plan.get("options"),
            **({"select": plan["select"]} if plan.get("select") else {}),
            **({"targets": plan["targets"]} if plan.get("targets") else {}),
            **({"search": search_key(plan, cfg)} if plan.get("search") else {}),
            "cfg": {f: getattr(cfg, f) for f in fields},
        }
    )
    return cache_root() / "bench" / "peft" / f"{task}-{plan['key']}-{key}.json"


# The run ---------------------------------------------------------------------------------------


def _estimate(cfg: PeftConfig, group: Any, plans: list[dict], rate: float) -> list[Phase]:
    """A phase per (task, row) that will train (not cached, not n/a), in run order."""
    mod = group.encoder.modality
    evaluate, train_f = FACTORS.get(mod, (1.0, 3.0))
    step = cfg.steps * cfg.batch_size * train_f * rate
    phases = []
    for name in group.data:
        n_val, n_test = len(group.val[name]), len(group.test[name])
        n_train = len(group.data[name].train.y)
        for plan in plans:
            if plan.get("reason") or plan.get("error"):
                continue
            if _row_path(cfg, group, name, plan).is_file():
                est = 0.0
            elif plan["key"] == "probe":  # features of the examples its batches visit
                seen = min(n_train, cfg.steps * cfg.batch_size * len(cfg.seeds))
                est = (seen + n_val + n_test) * evaluate * rate
            else:
                k = search_key(plan, cfg)
                grid = sum(map(len, k["lrs"])) * k["seeds"]  # at the seeds the pick is made on
                runs = grid + len(cfg.seeds) - k["seeds"]  # then the other seeds
                cost = step * (_FULL_COST if plan["key"] == "full" else 1.0)
                evals = grid * n_val + len(cfg.seeds) * n_test
                est = (runs * cost + evals * evaluate * rate) * _SLACK
                est *= _ROW_COST.get(plan["key"], 1.0)
            phases.append(Phase(f"{mod}/{name}/{plan['key']}", "train", est))
    return phases


def _line(key: str, task: str, row: dict) -> str:
    if row["status"] != "ok":
        return f"{key} on {task}: {row['status']}: {row.get('error') or row.get('reason')}"
    cached = " (cached)" if row["cached"] else ""
    return f"{key} on {task}: lr {row['lr']:g}, test {np.mean(row['acc']):.1%}{cached}"


def run_peft(cfg: PeftConfig, console: Any | None = None) -> dict[str, Any]:
    """Run the PEFT track; returns the results (see :mod:`splice.bench.peft_report`).

    ``console`` (a rich Console) gets the estimate, a line per lr tried and one per row.
    Every process computes on one torch thread (the numbers do not depend on ``workers``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, console)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: PeftConfig, console: Any | None) -> dict[str, Any]:
    from splice.data.local import resolve_task

    task_objs = [resolve_task(t) for t in cfg.tasks]
    modalities = sorted({t.modality for t in task_objs}, reverse=True)  # text first
    workers = workers_for(cfg.workers, cfg.device)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with PoolProgress(console, time.perf_counter) as progress:
        progress.workers = workers
        groups = [
            load_backbone(cfg, m, [t for t in task_objs if t.modality == m]) for m in modalities
        ]
        scfg = {g.encoder.modality: _suite_config(cfg, g.encoder.modality) for g in groups}
        plans = {m: _row_plans(scfg[m], g.encoder) for m, g in zip(scfg, groups, strict=True)}
        rate = {g.encoder.modality: calibrate(g.encoder, g.val) for g in groups}
        load_s = time.perf_counter() - t0
        phases = [p for m, g in zip(scfg, groups, strict=True)
                  for p in _estimate(scfg[m], g, plans[m], rate[m])]  # fmt: skip
        progress.plan(phases)
        est = {p.key: p.est for p in phases}
        first = sum(v for k, v in est.items() if k.endswith("/probe"))  # in the parent
        total = first + makespan([v for k, v in est.items() if not k.endswith("/probe")], workers)
        n_rows = max(len(p) for p in plans.values())
        steps = "/".join(str(c.steps) for c in scfg.values())
        progress.say(
            f"estimate {clock(load_s + total)} on this machine: {len(cfg.tasks)} tasks × "
            f"{n_rows} rows × {len(cfg.seeds)} seed(s), {steps} steps each, {workers} "
            f"worker(s); load {clock(load_s)} (done), training and evaluation {clock(total)}"
        )

        def finish(job: Job, row: dict, lines: list[str], seconds: float) -> None:
            rows[job.index].update(row)
            for line in lines:
                progress.say(line)
            key = f"{job.at}/{job.plan['key']}"
            progress.done(key, _line(job.plan["key"], job.row["task"], row), seconds)

        jobs = []
        for g in groups:
            mod = g.encoder.modality
            for name in g.data:
                task, head_lr = Task(g, name, scfg[mod]), 1e-2  # the probe's pick replaces it
                task.train_x  # noqa: B018 — tokenised here, before the workers fork
                for plan in plans[mod]:
                    if (row := start_row(rows, plan, mod, name)) is None:
                        continue
                    path = _row_path(scfg[mod], g, name, plan)
                    at = f"{mod}/{name}"
                    job = Job(len(rows) - 1, row, task, plan, head_lr, path,
                              est.get(f"{at}/{plan['key']}", 0.0), at)  # fmt: skip
                    probe = plan["key"] == "probe"  # cheap, and every other row needs its lr
                    if probe or path.is_file():  # here and now (cached: a file read)
                        finish(job, *run_job(job))
                    else:
                        jobs.append(job)
                    head_lr = row.get("lr", head_lr) if probe else head_lr
                    row["head_lr"] = head_lr
        for job, *done in run_jobs(jobs, workers):
            finish(job, *done)
    # each row's estimate and seconds (in its worker), for the estimate's calibration
    row_s = {k: [round(p.est, 1), round(p.actual or 0.0, 1)] for k, p in progress.phases.items()}
    return {
        "track": "peft",
        "config": cfg.model_dump(mode="json"),
        "protocol": PROTOCOL,
        "tasks": {t.name: {"modality": t.modality, "about": t.description} for t in task_objs},
        "rows": rows,
        "meta": run_meta(t0, load_s, load_s + total, cfg.device)
        | {"workers": workers, "row_s": row_s},
    }
