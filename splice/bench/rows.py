"""The merge track's table rows: the zero-shot and individual references and one row per merge
setting of a (backbone, seed), each written to the run's journal as it finishes and read back
from it when an interrupted run resumes (:mod:`splice.bench.journal`). Shared by the default
protocol (:func:`splice.bench.run_bench`) and the paper protocol (:mod:`splice.bench.paper`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
from torch import Tensor

from splice.bench.bn_repair import NO_BN, repairer
from splice.bench.finetune import apply_deltas
from splice.bench.journal import Journal
from splice.bench.merging import MergeSpec, merge_state, unsupported
from splice.bench.progress import Phase, Progress
from splice.bench.suite import Suite

__all__ = ["Row", "add_row", "evaluate_rows", "learn", "mean_acc", "resumed"]


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


def evaluate_rows(
    suite: Suite,
    specs: Sequence[MergeSpec],
    rows: dict[str, Row],
    skipped: dict[str, str],
    seed: int,
    progress: Progress,
    journal: Journal,
) -> None:
    """Evaluate the reference rows and every setting; one progress line each. A row found in
    ``journal`` (an interrupted run resumed) is read from it, a row evaluated is added to it
    (``Journal(None, {})`` keeps nothing)."""
    tasks = list(suite.data)
    at = f"{suite.encoder.modality}/{seed}"
    names = sorted({n for r in suite.runs.values() for n in r.deltas})
    state = suite.encoder.module.state_dict()
    base = {n: state[n] for n in names}
    own = {t: {**base, **apply_deltas(base, suite.runs[t].deltas)} for t in tasks}
    n_tune = sum(len(s.tune) for s in specs)
    start = time.perf_counter()
    ref = journal.row(
        f"evaluate/{at}/references",
        lambda: {
            "zero_shot": suite.acc(None),
            "individual": {t: suite.acc(own[t], tasks=[t])[t] for t in tasks},  # own task only
            "val_own": {t: suite.acc(own[t], "val", [t])[t] for t in tasks} if n_tune else {},
        },
    )
    add_row(rows, "zero_shot", "zero-shot", "reference", ref["zero_shot"])
    add_row(rows, "individual", "individual", "reference", ref["individual"])
    val_own = ref["val_own"]
    zero, ind = mean_acc(rows["zero_shot"].acc), np.mean(list(ref["individual"].values()))
    progress.done(
        f"evaluate/{at}/references",
        f"evaluate zero-shot {zero:.1%}, individual {ind:.1%}",
        time.perf_counter() - start,
    )
    models = list(own.values())
    tested: dict[str, tuple[dict[str, float], float]] = {}  # one test run per setting
    repair = repairer(suite, own, specs)  # None: no spec asks for it, or no batch norm

    def setting(spec: MergeSpec) -> dict[str, Any]:
        """One row: ``{"skip": reason}`` or its accuracies, merge seconds and parameters."""
        reason = unsupported(spec, len(tasks)) or (NO_BN if spec.repair_bn and not repair else None)
        if reason:
            return {"skip": reason}
        fix = repair if spec.repair_bn and repair else dict  # dict: the merge as it is
        if spec.learned:
            merged, secs = learn(suite, spec, seed)
            return {"acc": suite.acc(fix(merged)), "secs": secs, "params": spec.params}
        chosen, best = spec, -1.0
        for value in spec.tune:
            merged, _ = merge_state(spec.with_value(value), base, models, seed)
            val = suite.acc(fix(merged), "val")
            score = float(np.mean([val[t] / max(val_own[t], 1e-9) for t in tasks]))
            if score > best:
                chosen, best = spec.with_value(value), score
        key = chosen.resolved_key()
        if key not in tested:
            merged, secs = merge_state(chosen, base, models, seed)
            tested[key] = suite.acc(fix(merged)), secs
        acc, secs = tested[key]
        return {"acc": acc, "secs": secs, "params": chosen.chosen}

    for spec in specs:
        start = time.perf_counter()
        key = f"evaluate/{at}/{spec.key}"
        row = journal.row(key, partial(setting, spec))
        if "skip" in row:
            skipped[spec.label] = row["skip"]
            progress.done(key, f"skip {spec.label}: {row['skip']}", 0.0)
            continue
        add_row(rows, spec.key, spec.label, "merge", row["acc"], row["secs"], row["params"])
        if not spec.learned:
            rows[spec.key].tuned = spec.tune_key if spec.tune else None
        label = rows[spec.key].label
        if spec.tune:
            label += f" → {rows[spec.key].params[-1][spec.tune_key]}"
        progress.done(
            key,
            f"evaluate {label}: avg acc {mean_acc(rows[spec.key].acc):.1%}",
            time.perf_counter() - start,
        )


def mean_acc(acc: Mapping[str, list[float]]) -> float:
    """Mean over tasks of the latest seed's accuracy."""
    return float(np.mean([v[-1] for v in acc.values()]))


def learn(
    suite: Suite, spec: MergeSpec, seed: int, split: str = "val"
) -> tuple[dict[str, Tensor], float]:
    """Run a learned merge on the validation splits (labels only if it needs them), or with
    ``split="test"`` on the unlabeled test inputs (transductive; a method that needs labels
    is refused)."""
    from splice.errors import SpliceError
    from splice.merge.learned import learned

    method = learned.get(spec.method)
    labeled = method.needs_labels(method.params(spec.params))
    if split == "test":
        if labeled:
            raise SpliceError(f"{spec.method}: a transductive run never sees test labels")
        data = dict(suite.test)
    else:
        val = suite.val
        data = {t: (val[t], suite.data[t].val.y) if labeled else val[t] for t in suite.data}
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


def add_row(
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


def resumed(plan: Sequence[Phase], journal: Journal) -> list[Phase]:
    """The plan with the phases already in ``journal`` (an interrupted run's) costing 0."""
    return [replace(p, est=0.0) if p.key in journal else p for p in plan]
