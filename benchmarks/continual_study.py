"""Share / iGSP settings against one LoRA per task, over seeds (issue #26's targets).

    flock /tmp/splice-heavy.lock python benchmarks/continual_study.py --suite vision
        [--profile quick|full] [--seeds 0,1] [--steps N] [--rows share,share_k4]
        [--work DIR] [--minutes M]

A profile's sequences and settings (``splice.bench.continual_training.PROFILES``; quick:
1000/50/200 examples per task, 30 steps, batch 32, EfficientNet-Lite0 at 32×32 or MiniLM at
max length 32; full: 2000/150/400, 150 steps, 64×64, max length 40), one
accuracy matrix per (row, seed) through :func:`splice.train.continual.run_sequence`. Every
seed runs ``lora_per_task`` first (the reference: its final average accuracy, its diagonal
for FWT, its stored parameters). Rows are ``name=method`` plus ``--set``-style options,
listed in ``ROWS``; results go to ``WORK/<suite>-<profile>-<steps>/<row>-s<seed>.json``, a
finished (row, seed) is skipped and an unfinished one resumes after its last finished task
(``runs/<row>-s<seed>/state``), so a study stopped by ``--minutes`` or killed goes on.
The table: per row, final average accuracy (mean ± sample sd over seeds), its difference to
one LoRA per task, BWT, and stored parameters as a share of one LoRA per task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_per_task": ("lora_per_task", {}),
    "sequential_lora": ("sequential_lora", {}),
    "share": ("share", {}),
    "share_v06": ("share", {"variance": 0.6}),  # the paper's rule (the default until 12/2026)
    "share_var1": ("share", {"variance": 1.0}),
    "share_k2": ("share", {"k": 2}),
    "share_k3": ("share", {"k": 3}),
    "share_k4": ("share", {"k": 4}),
    "share_k8": ("share", {"k": 8}),
    "share_k32": ("share", {"k": 32}),
    "share_refit": ("share", {"variance": 0.6, "refit": 0.3}),
    "share_k3_refit": ("share", {"k": 3, "refit": 0.3}),
    "share_k4_refit": ("share", {"k": 4, "refit": 0.3}),
    "share_k8_refit": ("share", {"k": 8, "refit": 0.3}),
    "share_k3_lr1e-2": ("share", {"k": 3, "lr": 1e-2}),
    "share_k4_lr1e-2": ("share", {"k": 4, "lr": 1e-2}),
    "share_k3_phi8": ("share", {"k": 3, "rank_updates": 8}),
    "share_k3_r4": ("share", {"k": 3, "r": 4, "alpha": 8.0}),
    "igsp": ("igsp", {}),
    "igsp_c1": ("igsp", {"candidates": 1}),
    "igsp_p2": ("igsp", {"prune_below": 0.2}),
    "igsp_p3": ("igsp", {"prune_below": 0.3}),
    "igsp_c1_p3": ("igsp", {"candidates": 1, "prune_below": 0.3}),
    "igsp_r2_p3": ("igsp", {"r": 2, "alpha": 4.0, "prune_below": 0.3}),
    "igsp_top2": ("igsp", {"top_k": 2}),
    "igsp_top2_p2": ("igsp", {"top_k": 2, "prune_below": 0.2}),
    "igsp_top1": ("igsp", {"top_k": 1}),
    "igsp_ph06": ("igsp", {"phase1": 0.6}),
    "igsp_reg0": ("igsp", {"reg": 0.0}),
}


def _say(i: int, name: str, row: list, seconds: float) -> None:
    print(f"  task {i} {name}: {seconds:.0f} s", flush=True)


def run_row(
    cfg: Any, encoder: Any, data: list[Any], row: str, seed: int, ref: Any, state: Path
) -> dict:
    from splice.continual.metrics import summary
    from splice.train.continual import ContinualConfig, run_sequence

    method, options = ROWS[row]
    options = dict(options)
    lr = options.pop("lr", None)  # the driver's learning rate, not a method option
    start = time.perf_counter()
    sizes = cfg.model_dump(include={"steps", "batch_size"})
    settings = ContinualConfig(method=method, options=options, seed=seed, lr=lr, **sizes)
    # resume: a row killed mid-sequence goes on after its last finished task
    run = run_sequence(encoder, data, settings, state, resume=True, reference=ref, on_task=_say)
    return {
        "row": row,
        "method": method,
        "options": ROWS[row][1],
        "seed": seed,
        "steps": cfg.steps,
        "R": run.R,
        "metrics": summary(run.R, ref),
        "stored": run.stored,
        "info": run.method.info(),
        "seconds": round(time.perf_counter() - start, 1),
        "task_seconds": run.seconds,  # per task, including tasks of an interrupted run
    }


def table(folder: Path) -> str:
    recs: dict[str, list[dict]] = {}
    for p in sorted(folder.glob("*-s*.json")):
        r = json.loads(p.read_text())
        recs.setdefault(r["row"], []).append(r)
    ref = {r["seed"]: r for r in recs.get("lora_per_task", [])}
    lines = [
        f"{folder.name}: final average accuracy (%), mean ± sd over seeds",
        "",
        "| row | seeds | avg acc | Δ vs LoRA/task | BWT (pts) | FWT (pts) | stored | ratio | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, rs in recs.items():
        rs.sort(key=lambda r: r["seed"])
        acc = [100 * r["metrics"]["final_avg_accuracy"] for r in rs]
        delta = [
            a - 100 * ref[r["seed"]]["metrics"]["final_avg_accuracy"]
            for a, r in zip(acc, rs, strict=True)
            if r["seed"] in ref
        ]
        bwt = [100 * r["metrics"]["bwt"] for r in rs]
        fwt = [100 * (r["metrics"]["fwt"] or 0.0) for r in rs]
        ratio = [
            r["stored"]["params"] / ref[r["seed"]]["stored"]["params"]
            for r in rs
            if r["seed"] in ref
        ]

        def ms(v: list[float]) -> str:
            if not v:
                return "n/a"
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):+.1f} ± {sd:.1f}"

        lines.append(
            f"| {row} | {','.join(str(r['seed']) for r in rs)} | "
            f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:.1f} | "
            f"{ms(delta)} | {ms(bwt)} | {ms(fwt)} | {rs[0]['stored']['params']:,} | "
            f"{statistics.mean(ratio) if ratio else float('nan'):.3f}× | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=("vision", "text"), default="vision")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=None, help="default: the profile's")
    ap.add_argument("--profile", choices=("quick", "full"), default="quick")
    ap.add_argument("--rows", default="share,igsp")
    ap.add_argument("--work", default="bench-out/continual_study")
    ap.add_argument("--minutes", type=float, default=9.0, help="stop starting rows after this")
    ap.add_argument("--table", action="store_true", help="only print the table")
    a = ap.parse_args()

    from splice.bench.continual_training import PROFILES, _sequence

    cfg = PROFILES[a.profile]
    cfg = cfg.model_copy(update={"steps": a.steps or cfg.steps})
    folder = Path(a.work) / f"{a.suite}-{a.profile}-{cfg.steps}"
    folder.mkdir(parents=True, exist_ok=True)
    if a.table:
        print(table(folder))
        return
    encoder, data = _sequence(cfg, a.suite)
    start = time.perf_counter()
    rows = ["lora_per_task"] + [r for r in a.rows.split(",") if r != "lora_per_task"]
    for seed in (int(s) for s in a.seeds.split(",")):
        for row in rows:
            path = folder / f"{row}-s{seed}.json"
            if path.exists():
                continue
            if (time.perf_counter() - start) / 60 > a.minutes:
                print("time budget spent; rerun to resume")
                print(table(folder))
                return
            refp = folder / f"lora_per_task-s{seed}.json"
            ref = None
            if row != "lora_per_task":
                R = json.loads(refp.read_text())["R"]
                ref = [R[i][i] for i in range(len(R))]
            rec = run_row(cfg, encoder, data, row, seed, ref, folder / "runs" / f"{row}-s{seed}")
            path.write_text(json.dumps(rec) + "\n")
            m = rec["metrics"]
            print(
                f"{row} seed {seed}: avg {100 * m['final_avg_accuracy']:.1f} "
                f"BWT {100 * m['bwt']:+.1f} stored {rec['stored']['params']:,} "
                f"info {rec['info']} ({rec['seconds']:.0f} s)",
                flush=True,
            )
    print(table(folder))


if __name__ == "__main__":
    main()
