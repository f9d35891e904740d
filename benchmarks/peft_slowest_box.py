"""The PEFT track's quick profile on the issue's slowest 2-core box, modelled from a run here.

    python benchmarks/peft_slowest_box.py RESULTS.json [...] [--train 3.4] [--rest 5]

For each ``results.json`` of ``splice bench --track peft`` (docs/bench.md, "How it was
sized"): each trained row's training (its seconds per step × steps × training runs) at
``--train`` times, the rest of its seconds (evaluation, the model copy, the saved file) at
``--rest`` times, the backbone loads and the probes (in the main process, before the pool) at
``--rest`` times; the other rows scheduled over the run's workers as the track does (longest
estimate first, a method's two rows not together where another can go between, each to the
first free worker). Prints the wall time, the rows' seconds per suite, the modelled minutes
and the modelled minutes with ``--startup`` seconds for start-up and the report.
"""

from __future__ import annotations

import argparse
import heapq
import json
from pathlib import Path


def model(results: dict, train: float, rest: float) -> dict:
    from splice.bench.peft_pool import apart

    cfg, meta = results["config"], results["meta"]
    rows = {f"{r['suite']}/{r['task']}/{r['key']}": r for r in results["rows"]}
    seconds: dict[str, float] = {}
    parent, jobs = meta["load_s"] * rest, []
    for key, (est, actual) in meta["row_s"].items():
        suite = key.split("/")[0]
        seconds[suite] = seconds.get(suite, 0.0) + actual
        row = rows[key]
        if row["key"] == "probe" or "s_per_step" not in row:
            parent += actual * rest
            continue
        steps = (cfg.get("suite_steps") or {}).get(suite, cfg["steps"])
        n = len(next(iter(row["val_seeds"].values()))) if row.get("val_seeds") else 1
        runs = len(row["val"]) * n + len(row["acc"]) - n  # the picks' seeds, then the others
        trained = min(actual, row["s_per_step"] * steps * runs)
        jobs.append((est, row["key"], trained * train + (actual - trained) * rest))
    by_est = sorted(range(len(jobs)), key=lambda i: -jobs[i][0])
    order = apart(by_est, [jobs[i][1] for i in range(len(jobs))])
    free = [0.0] * meta.get("workers", 2)
    for i in order:
        heapq.heappush(free, heapq.heappop(free) + jobs[i][2])
    return {"wall": meta["wall_s"], "rows": seconds, "model_s": parent + max(free)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--train", type=float, default=3.4, help="training slowdown")
    ap.add_argument("--rest", type=float, default=5.0, help="evaluation and load slowdown")
    ap.add_argument("--startup", type=float, default=30.0, help="start-up and report, seconds")
    args = ap.parse_args()
    for path in args.results:
        m = model(json.loads(path.read_text()), args.train, args.rest)
        rows = " / ".join(f"{k} {v:.0f}" for k, v in m["rows"].items())
        print(f"{path}: wall {m['wall']:.1f} s; rows' seconds {rows}; slowest box "
              f"{m['model_s'] / 60:.1f} min, {(m['model_s'] + args.startup) / 60:.1f} min "
              f"with start-up and report")  # fmt: skip


if __name__ == "__main__":
    main()
