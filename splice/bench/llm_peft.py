"""The PEFT track of the LLM suite: adapter methods on a causal LM, scored by generated answers.

The PEFT track's rows and protocol (:mod:`splice.bench.peft`) on the LLM suite's tasks,
training and scoring (:mod:`splice.bench.llm_train`, :mod:`splice.bench.llm_eval`):

- the rows are :func:`splice.bench.peft._row_plans`' on the causal LM (every registered
  method, or ``methods``; one whose layer kinds the targets lack, or that finds no sites of its
  own, gets an n/a row with the reason), with the *zero-shot* model in place of the linear
  probe (a causal LM needs no head) and *full fine-tuning* where the profile runs it;
- each row is :func:`splice.bench.peft_rows.run_row`: the lr picked on the validation split
  from ``lr_grid``, the pick scored once on test; its measurements (trainable parameters,
  s/step, peak RSS, adapter bytes) are the PEFT track's; rows are cached the same way;
- a run is :func:`splice.bench.llm_train.train_lm` (answer-token loss, the one loop) and a
  score is the suite's headline exact match (:func:`splice.bench.llm.headline`:
  label-constrained where the task has labels, free otherwise).

The results are the PEFT track's (``track: peft``, suite ``llm``), so its report
(:mod:`splice.bench.peft_report`) prints and writes them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import Field

from splice._schema import Strict
from splice.bench.peft_rows import (
    _peak_mb,
    _reset_peak,
    full_grid,
    run_cached,
    run_row,
    start_row,
)

__all__ = ["LLM_PEFT_PROFILES", "LLMPeftConfig", "configure_llm_peft", "run_llm_peft"]

PROTOCOL = (
    "Per task: each row's lr is picked on the validation split (first seed) from the lr grid "
    "(full fine-tuning: its own grid), ties to the smaller lr, a pick on a grid edge growing "
    "the grid at most `grow` times; the picked run is scored once on the test split. Score: "
    "exact match of the greedy answer (label-constrained where the task has labels). Every "
    "row trains the same answer-token loss for the same steps and batches; no head."
)


class LLMPeftConfig(Strict):
    """Everything that defines a PEFT-track run of the LLM suite (written into results.json)."""

    model: str = Field("smollm2", description="'smollm2' or a local causal-LM dir")
    tasks: tuple[str, ...] = ("sentiment", "topic")
    methods: tuple[str, ...] | None = Field(("lora", "dora", "ia3"), description="None = all")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    budget: int | None = Field(None, gt=0, description="size every method to ~N parameters")
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    full: bool = Field(False, description="run the full fine-tuning row")
    steps: int = 30
    batch_size: int = 8
    lr_grid: tuple[float, ...] = (2e-3,)
    full_lr_grid: tuple[float, ...] = (5e-5,)
    head_lr_grid: tuple[float, ...] = ()  # no head; kept for the PEFT report's header
    grow: int = 0
    seeds: tuple[int, ...] = (0,)
    caps: tuple[int, int, int] = (2000, 24, 40)
    split_seed: int = 0
    max_words: int = 40
    eval_batch_size: int = 16
    max_new: int = 8
    device: str = "cpu"


LLM_PEFT_PROFILES: dict[str, LLMPeftConfig] = {
    "quick": LLMPeftConfig(),
    "full": LLMPeftConfig(
        tasks=("sentiment", "topic", "supersense", "headword"),
        methods=None,
        full=True,
        steps=40,
        lr_grid=(1e-3, 3e-3, 1e-2),
        full_lr_grid=(3e-5, 1e-4),
    ),
}


def configure_llm_peft(
    profile: str = "quick",
    *,
    methods: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> LLMPeftConfig:
    """A profile's config with command-line overrides: ``methods`` (``["all"]``: every one),
    ``options`` (per method), and any of ``tasks``, ``steps``, ``seed``, ``budget``,
    ``device``, ``model`` (None: the profile's)."""
    from splice.bench.llm import configure_llm
    from splice.bench.peft import method_update

    tasks = overrides.pop("tasks", None)
    base = configure_llm(tasks=tasks)  # validates the task names (a UsageError names them)
    if profile not in LLM_PEFT_PROFILES:
        configure_llm(profile)  # the same error as the merge track's
    update: dict[str, Any] = {"tasks": base.tasks} if tasks else {}
    if methods is not None and list(methods) == ["all"]:
        update["methods"] = None
    update |= method_update(methods, options)
    if (seed := overrides.pop("seed", None)) is not None:
        update["seeds"] = (seed,)
    update |= {k: v for k, v in overrides.items() if v is not None}
    return LLM_PEFT_PROFILES[profile].model_validate(
        LLM_PEFT_PROFILES[profile].model_dump() | update
    )


class LLMTask:
    """One generation task: the interface of :class:`splice.bench.peft_rows.Task`
    (``run``/``score``) over a causal LM."""

    def __init__(self, model: Any, tok: Any, encoded: Mapping[str, Any], cfg: LLMPeftConfig):
        self.model, self.tok, self.encoded, self.cfg = model, tok, encoded, cfg
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(self, key: str, lr: float, head_lr: float, seed: int, plan: dict) -> dict:
        from splice.bench.llm_train import LMTrainConfig, train_lm

        del head_lr  # no head
        _reset_peak()
        cfg = self.cfg
        targets = tuple(plan.get("targets") or cfg.targets)  # --set METHOD.targets=[...]
        train = LMTrainConfig(finetune=key, targets=targets, steps=cfg.steps,
                              batch_size=cfg.batch_size, lr=lr)  # fmt: skip
        opts = None if key == "full" else plan.get("options", {})
        tuned, params, state = train_lm(self.model, self.encoded["train"], train, seed,
                                        self.pad, options=opts)  # fmt: skip
        return {
            "model": tuned,
            "head": None,
            "s_per_step": state.seconds / max(1, cfg.steps),
            "peak_rss_mb": _peak_mb(),
            "adapter_params": sum(p.numel() for p in {id(p): p for p in params}.values()),
            "head_params": 0,
        }

    def score(self, out: dict, split: str, loss: bool = False) -> Any:
        """The headline exact match on ``split``; with ``loss``, (that, the mean answer
        cross-entropy −loglik) — the PEFT track's tie-break for searched rows."""
        from splice.bench.llm import headline
        from splice.bench.llm_eval import score

        cfg = self.cfg
        got = score(out["model"], self.tok, self.encoded[split], cfg.eval_batch_size, cfg.max_new)
        return (headline(got), -got["loglik"]) if loss else headline(got)


def _plans(cfg: LLMPeftConfig, model: Any) -> list[dict[str, Any]]:
    """The PEFT track's row plans on the causal LM: zero-shot in place of the probe."""
    from splice.bench.peft import _row_plans

    encoder = SimpleNamespace(module=model, default_targets=cfg.targets)
    plans = [p for p in _row_plans(cfg, encoder) if p["key"] != "probe"]  # type: ignore[arg-type]
    for p in plans:
        if p["key"] == "full" and not cfg.full:
            p["reason"] = "full fine-tuning runs in the full profile (--full)"
        elif p["kind"] == "selector" and not p.get("reason"):
            p["reason"] = (
                f"the {p['key']} selector's calibration runs through the classification "
                "tracks' head loss (splice.bench.finetune.train); not wired to the answer-token "
                "loss of a causal LM"
            )
    zero = {"key": "zero_shot", "label": "zero-shot", "kind": "reference", "family": "–"}
    return [zero, *plans]


def _row_path(cfg: LLMPeftConfig, model_key: str, task: str, data_key: str, plan: dict) -> Path:
    from splice.data.cache import cache_root, stable_hash

    fields = ("targets", "steps", "batch_size", "lr_grid", "full_lr_grid", "grow", "seeds",
              "max_new")  # fmt: skip
    key = stable_hash({"v": 1, "model": model_key, "data": data_key, "row": plan["key"],
                       "options": plan.get("options"),
                       **({"targets": plan["targets"]} if plan.get("targets") else {}),
                       "cfg": {f: getattr(cfg, f) for f in fields}})  # fmt: skip
    return cache_root() / "bench" / "peft-llm" / f"{task}-{plan['key']}-{key}.json"


def _zero_shot(task: LLMTask) -> dict[str, Any]:
    acc = task.score({"model": task.model}, "test")
    return {"lr": 0.0, "acc": [acc] * len(task.cfg.seeds), "s_per_step": 0.0,
            "peak_rss_mb": _peak_mb(), "adapter_params": 0, "head_params": 0,
            "saved_bytes": 0}  # fmt: skip


def run_llm_peft(cfg: LLMPeftConfig, console: Any | None = None) -> dict[str, Any]:
    """Run the LLM suite's PEFT track; returns results for :mod:`splice.bench.peft_report`."""
    from splice.bench.llm_eval import encode
    from splice.bench.llm_plan import EXAMPLE_S, STEP_S, model_key
    from splice.bench.peft import run_meta
    from splice.bench.progress import Phase, Progress, clock
    from splice.data.causal_lm import load_causal_lm
    from splice.data.llm_tasks import load_gen_task
    from splice.data.registry import Caps

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with Progress(console, time.perf_counter) as progress:
        model, tok = load_causal_lm(cfg.model, device=cfg.device)
        data = {t: load_gen_task(t, Caps(*cfg.caps), cfg.split_seed, cfg.max_words)
                for t in cfg.tasks}  # fmt: skip
        splits = ("train", "val", "test")
        tasks = {t: LLMTask(model, tok, {s: encode(tok, d, s) for s in splits}, cfg)
                 for t, d in data.items()}  # fmt: skip
        plans, mkey = _plans(cfg, model), model_key(cfg.model)
        load_s = time.perf_counter() - t0
        phases = []
        for t, d in data.items():
            for p in plans:
                if p.get("reason") or p.get("error"):
                    continue
                grid = cfg.full_lr_grid if full_grid(p) else cfg.lr_grid
                runs = 0 if p["key"] == "zero_shot" else len(grid) + len(cfg.seeds) - 1
                n = len(d.test) * len(cfg.seeds) + (len(d.val) * runs if runs else 0)
                done = _row_path(cfg, mkey, t, d.key, p).is_file()
                est = 0.0 if done else runs * cfg.steps * STEP_S + n * EXAMPLE_S
                phases.append(Phase(f"llm/{t}/{p['key']}", "train", est))
        progress.plan(phases)
        total = sum(p.est for p in phases)
        progress.say(
            f"estimate {clock(load_s + total)}: {len(cfg.tasks)} tasks × {len(plans)} rows, "
            f"{cfg.steps} steps each; load {clock(load_s)} (done)"
        )
        for t, task in tasks.items():
            for plan in plans:
                if (row := start_row(rows, plan, "llm", t)) is None:
                    continue
                start = time.perf_counter()

                def say(text: str, at: str = f"llm/{t}") -> None:
                    progress.say(f"          {at}: {text}")

                def compute(task: LLMTask = task, p: dict = plan) -> dict:
                    return (
                        _zero_shot(task) if p["key"] == "zero_shot" else run_row(task, p, 0.0, say)
                    )

                out = run_cached(row, _row_path(cfg, mkey, t, data[t].key, plan), compute)
                why = row.get("reason") or row.get("error")
                text = f"test {out['acc'][0]:.1%}, lr {out['lr']:g}" if out else f"{why}"
                cached = " (cached)" if row["cached"] else ""
                progress.done(f"llm/{t}/{plan['key']}", f"{plan['key']} on {t}: {text}{cached}",
                              time.perf_counter() - start)  # fmt: skip
    return {
        "track": "peft",
        "suite": "llm",
        "metric": "exact match",
        "config": cfg.model_dump(mode="json"),
        "protocol": PROTOCOL,
        "tasks": {t: {"modality": "llm", "about": d.task.description} for t, d in data.items()},
        "rows": rows,
        "meta": run_meta(t0, load_s, load_s + total, cfg.device),
    }
