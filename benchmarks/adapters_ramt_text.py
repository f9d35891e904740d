"""R-AMT against the linear probe on every task of the PEFT track's text suite (run by hand).

    python benchmarks/adapters_ramt_text.py [--profile full] [--tasks rt_sentiment,...]
        [--set init=0.0625] [--json out.json]

The rows ``probe`` and ``ramt`` of ``splice bench --track peft --suite text --methods ramt``
(:func:`splice.bench.peft.run_peft`: the same protocol, the same cache entries; the lr and
R-AMT's (init, τ) picked on validation averaged over the first two seeds, the test split
scored once per seed) without its full fine-tuning rows, which this comparison does not need
and which cost as much as the rest. Prints per task and seed the probe's and R-AMT's test
accuracy, the lr and (init, τ) picked and R-AMT's validation at each point of its grid (and
per seed), then the mean difference per task. ``--set`` gives R-AMT options (as ``--set
ramt.KEY=VALUE`` of ``splice bench``). The text-suite tables of docs/adapters.md ("R-AMT on
the text suite" and below) come from this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    from splice.bench.runner import TEXT_TASKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="full", choices=["quick", "full"])
    ap.add_argument("--tasks", default=",".join(TEXT_TASKS), help="comma-separated text tasks")
    ap.add_argument("--set", action="append", default=[], help="R-AMT option KEY=VALUE (JSON)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()

    import splice.bench.peft as peft

    options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = peft.configure_peft(args.profile, suite="text", tasks=args.tasks.split(","),
                              methods=["ramt"], options={"ramt": options} if options else None,
                              workers=args.workers)  # fmt: skip
    plans = peft._row_plans
    peft._row_plans = lambda c, enc: [p for p in plans(c, enc) if p["key"] != "full"]
    results = peft.run_peft(cfg)
    rows = {(r["task"], r["key"]): r for r in results["rows"]}
    print(f"{'task':<20} {'seed':>4} {'probe':>6} {'R-AMT':>6} {'diff':>6}  lr picked (R-AMT val)")
    for task in cfg.tasks:
        probe, ramt = rows[(task, "probe")], rows[(task, "ramt")]
        if ramt["status"] != "ok":
            print(f"{task:<20} {ramt['status']}: {ramt.get('error') or ramt.get('reason')}")
            continue
        each = ramt.get("val_seeds") or {}  # validation per seed where the pick averages two
        val = " / ".join(
            f"{lr}: {v:.1%}"
            + (f" ({', '.join(f'{a:.1%}' for a in each[lr])})" if lr in each else "")
            for lr, v in ramt["val"].items()
        )
        picked = "".join(f" {k}={v:g}" for k, v in ramt.get("picked", {}).items())
        for seed, p, r in zip(cfg.seeds, probe["acc"], ramt["acc"], strict=True):
            print(f"{task:<20} {seed:4d} {p:6.1%} {r:6.1%} {100 * (r - p):+6.1f}  "
                  f"probe {probe['lr']:g}, R-AMT {ramt['lr']:g}{picked} ({val})")  # fmt: skip
        mp, mr = np.mean(probe["acc"]), np.mean(ramt["acc"])
        print(f"{task:<20} {'mean':>4} {mp:6.1%} {mr:6.1%} {100 * (mr - mp):+6.1f}")
    print(f"wall {results['meta']['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(results["rows"], indent=1))


if __name__ == "__main__":
    main()
