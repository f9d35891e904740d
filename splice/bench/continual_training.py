"""The continual-training track (``splice bench --track continual``): Share, iGSP and the baselines
on the bench's task sequences, one accuracy matrix per method.

Per sequence (the 6 text tasks on MiniLM, the 4 image tasks on EfficientNet-Lite0, in the
bench's order): every method of :mod:`splice.continual` through
:func:`splice.train.continual.run_sequence`, one LoRA per task first (its diagonal is the
forward-transfer reference); then the merge-based continual methods (OPCM, continual task
arithmetic) fed by those same per-task adapters and heads, through the merge view's
:func:`splice.bench.continual.run_continual`. Writes ``continual-training.json`` (every
``R[i][j]``, metrics and stored parameters), ``continual-training.md``, a heatmap of each
matrix (``continual-training-heatmap.png``) and the average-accuracy-after-each-task lines
(``continual-training.png``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from splice._schema import Strict

__all__ = ["PROFILES", "TrackConfig", "configure_track", "run_track", "write_track"]

TRAINED = ("lora_per_task", "sequential_lora", "share", "igsp")
MERGED = ("opcm", "continual_task_arithmetic")


class TrackConfig(Strict):
    """One continual-training benchmark run (written into the JSON)."""

    suites: tuple[str, ...] = Field(("vision",), description="text and/or vision sequences")
    methods: tuple[str, ...] = TRAINED + MERGED
    options: dict[str, dict[str, Any]] = Field(
        {}, description="per-method hyperparameters, e.g. {'share': {'k': 8}}"
    )
    steps: int = Field(30, gt=0, description="optimizer steps per task")
    batch_size: int = 32
    seed: int = 0
    caps: tuple[int, int, int] = Field((1000, 50, 200), description="train/val/test caps")
    max_len: int = 32
    image_size: int = 32
    device: str = "cpu"


PROFILES = {
    # ≈ 2.5 min on the 2-core dev box (10 min on a 4× slower one): the 4-task image sequence.
    "quick": TrackConfig(),
    "full": TrackConfig(
        suites=("text", "vision"), steps=150, caps=(2000, 150, 400), max_len=40, image_size=64
    ),
}


def configure_track(
    full: bool = False,
    *,
    suite: str | None = None,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> TrackConfig:
    """A profile with command-line overrides (``suite``: text, vision or all)."""
    from splice.errors import UsageError

    cfg = PROFILES["full" if full else "quick"]
    update: dict[str, Any] = {}
    if suite is not None:
        suites = {"text": ("text",), "vision": ("vision",), "all": ("text", "vision")}
        if suite not in suites:
            raise UsageError(f"unknown suite {suite!r}", fix="use text, vision or all")
        update["suites"] = suites[suite]
    if methods is not None:
        unknown = [m for m in methods if m not in TRAINED + MERGED]
        if unknown:
            raise UsageError(
                f"unknown continual method {unknown[0]!r}", fix=f"choose from {TRAINED + MERGED}"
            )
        update["methods"] = tuple(methods)
    for key, value in (("steps", steps), ("seed", seed), ("device", device)):
        if value is not None:
            update[key] = value
    return cfg.model_copy(update=update)


def _sequence(cfg: TrackConfig, suite: str) -> tuple[Any, list[Any]]:
    from splice.bench.runner import TEXT_TASKS, VISION_TASKS
    from splice.data.encoders import load_encoder
    from splice.data.registry import TASKS, Caps, load_task

    names = TEXT_TASKS if suite == "text" else VISION_TASKS
    data = [load_task(TASKS.get(n), Caps(*cfg.caps), 0) for n in names]
    encoder = load_encoder(
        "text" if suite == "text" else "image",
        max_len=cfg.max_len,
        image_size=cfg.image_size,
        device=cfg.device,
    )
    return encoder, data


def _merged(encoder, data, per_task, names, seed, suite_name) -> list[dict[str, Any]]:
    """OPCM / continual TA over the per-task LoRAs, evaluated with the same heads."""
    from splice.bench.continual import run_continual
    from splice.bench.finetune import Head, TaskRun
    from splice.bench.suite import Suite

    val = {d.name: encoder.prepare(d.val.x) for d in data}
    test = {d.name: encoder.prepare(d.test.x) for d in data}
    suite = Suite(encoder, {d.name: d for d in data}, val, test)
    for d in data:
        h = per_task.heads[d.name]
        head = Head(h.weight.detach().cpu(), h.bias.detach().cpu())
        suite.runs[d.name] = TaskRun(d.name, per_task.method.deltas(d.name), head)
    individual = {t: per_task.R[i][i] for i, t in enumerate(per_task.tasks)}
    records = []
    for rec in run_continual(suite, names, 1, seed, individual):
        if rec["method"] == "individual":
            continue
        rec["modality"] = suite_name
        start = time.perf_counter()
        numel = sum(d.shape.numel() for d in suite.runs[data[0].name].deltas.values())
        rec["stored"] = {"params": numel, "bytes": 4 * numel, "dense_delta": numel}
        rec["seconds"] = round(time.perf_counter() - start, 2)
        records.append(rec)
    return records


def run_track(cfg: TrackConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method on every sequence of ``cfg``; returns the records (JSON-ready)."""
    from splice.continual.metrics import summary
    from splice.train.continual import ContinualConfig, run_sequence

    records: list[dict[str, Any]] = []
    trained = [m for m in TRAINED if m in cfg.methods or (m == "lora_per_task" and set(MERGED)
               & set(cfg.methods))]  # fmt: skip
    for suite in cfg.suites:
        encoder, data = _sequence(cfg, suite)
        say(f"{suite}: {len(data)} tasks " + " → ".join(d.name for d in data))
        reference = None
        per_task = None
        for method in trained:
            start = time.perf_counter()
            run = run_sequence(
                encoder,
                data,
                ContinualConfig(
                    method=method,
                    options=cfg.options.get(method, {}),
                    steps=cfg.steps,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed,
                ),
                reference=reference,
            )
            if method == "lora_per_task":
                per_task = run
                reference = [run.R[i][i] for i in range(len(data))]
            rec = {
                "method": method,
                "modality": suite,
                "order": run.tasks,
                "R": run.R,
                "stored": run.stored,
                "info": run.method.info(),
                "seconds": round(time.perf_counter() - start, 1),
            }
            rec["metrics"] = summary(run.R, reference)
            rec["avg_seen"] = rec["metrics"]["avg_accuracy"]
            if method in cfg.methods:
                records.append(rec)
                _say_record(say, rec)
        merged = [m for m in MERGED if m in cfg.methods]
        if merged and per_task is not None:
            start = time.perf_counter()
            for rec in _merged(encoder, data, per_task, merged, cfg.seed, suite):
                rec["metrics"] = summary(rec["R"], reference)
                rec["seconds"] = round(time.perf_counter() - start, 1)
                records.append(rec)
                _say_record(say, rec)
    return {"config": cfg.model_dump(mode="json"), "records": records}


def _say_record(say: Callable[[str], None], rec: dict[str, Any]) -> None:
    m = rec["metrics"]
    bwt = "n/a" if m["bwt"] is None else f"{100 * m['bwt']:+.1f}"
    say(
        f"  {rec['method']}: avg acc {100 * m['final_avg_accuracy']:.1f} %, BWT {bwt} pts, "
        f"stored {rec['stored']['params']:,} params ({rec['seconds']:.0f} s)"
    )


def to_table(results: dict[str, Any]) -> str:
    """Markdown: per sequence and method, the final average accuracy, BWT, forgetting, FWT
    and stored parameters (and their ratio to one LoRA per task)."""
    lines = ["# Continual training", ""]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results["records"]:
        by.setdefault(r["modality"], []).append(r)
    for suite, recs in by.items():
        ref = next((r["stored"]["params"] for r in recs if r["method"] == "lora_per_task"), None)
        lines += [
            f"{suite}: {' → '.join(recs[0]['order'])}",
            "",
            "| method | avg acc after last (%) | BWT (pts) | forgetting (pts) | FWT (pts) "
            "| stored params | vs one LoRA per task |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in recs:
            m = r["metrics"]

            def pts(v: float | None) -> str:
                return "n/a" if v is None else f"{100 * v:+.1f}"

            ratio = f"{r['stored']['params'] / ref:.3f}×" if ref else "n/a"
            lines.append(
                f"| {r['method']} | {100 * m['final_avg_accuracy']:.1f} | {pts(m['bwt'])} | "
                f"{pts(m['forgetting'])} | {pts(m['fwt'])} | {r['stored']['params']:,} | {ratio} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_track(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the JSON, the Markdown table, the heatmaps and the line plot into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splice.bench.continual import write_continual

    out.mkdir(parents=True, exist_ok=True)
    js, md, heat = (out / f"continual-training{s}" for s in (".json", ".md", "-heatmap.png"))
    js.write_text(json.dumps(results, indent=2) + "\n")
    records = results["records"]
    lines = write_continual(
        [{**r, "avg_seen": r["metrics"]["avg_accuracy"]} for r in records],
        out,
        stem="continual-training",
        title="Continual training",
        xlabel="tasks trained so far",
    )
    md.write_text(to_table(results) + "\n" + lines[0].read_text().split("\n", 2)[2])
    suites = list(dict.fromkeys(r["modality"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(
        len(suites), len(methods), figsize=(2.6 * len(methods), 2.6 * len(suites)), squeeze=False
    )
    for a in axes.flat:
        a.axis("off")
    for r in records:
        ax = axes[suites.index(r["modality"])][methods.index(r["method"])]
        R = np.array([[np.nan if v is None else 100 * v for v in row] for row in r["R"]])
        ax.axis("on")
        ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(R):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_title(f"{r['method']} ({r['modality']})", fontsize=8)
        ax.set_xlabel("task j", fontsize=7)
        ax.set_ylabel("after task i", fontsize=7)
        ax.set_xticks(range(len(R)))
        ax.set_yticks(range(len(R)))
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [js, md, heat, lines[1]]
