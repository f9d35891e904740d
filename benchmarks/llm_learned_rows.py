"""LLM suite: the learned merges wired to the causal LM and EMR-Merging, on the quick profile.

Runs ``splice bench --suite llm``'s quick profile (its cached LoRA fine-tunes: run the quick
profile first, or this trains them) with only the rows asked for besides zero-shot and
individual: ``--methods`` (RegMean, RegMean++, Fisher merging with statistics from
``--samples`` training sequences per task, or any merge method, e.g. ``linear`` for the plain
average they are compared with) and ``--emr`` (EMR-Merging, a rebuilt model per task). Prints
the table, each learned row's statistics seconds and the run's wall time. Run by hand (each
stage ≤ 10 min on one core with the fine-tunes cached)::

    OMP_NUM_THREADS=1 python benchmarks/llm_learned_rows.py --methods regmean,fisher --emr
    OMP_NUM_THREADS=1 python benchmarks/llm_learned_rows.py --methods regmean_plusplus
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="regmean,fisher")
    parser.add_argument("--samples", type=int, default=None, help="default: the profile's")
    parser.add_argument("--emr", action="store_true", help="add the EMR-Merging row")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    from splice.bench.llm import LLM_PROFILES, run_llm
    from splice.bench.llm_report import markdown, print_llm_table

    cfg = LLM_PROFILES["quick"]
    cfg = cfg.model_copy(
        update={
            "methods": tuple(m for m in args.methods.split(",") if m),
            "adapter_methods": (),
            "learned_samples": args.samples or cfg.learned_samples,
            "emr": args.emr,
        }
    )
    results = run_llm(cfg, say=lambda line: print(line, file=sys.stderr, flush=True))
    print_llm_table(results, Console(width=200))
    print(markdown(results))
    for r in results["rows"]:
        if "stats_s" in r:
            stats, merge = r["stats_s"][-1], r["merge_s"][-1]
            print(f"{r['label']}: statistics {stats:.1f} s, merge (with statistics) {merge:.1f} s")
    print(f"wall {results['meta']['wall_s']:.0f} s ({results['meta']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
