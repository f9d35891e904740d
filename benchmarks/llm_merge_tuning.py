"""LLM suite: does tuning λ on validation lift the best merge toward 90 % normalized EM?

Runs ``splice bench --suite llm``'s quick profile (same cached fine-tunes: run the quick
profile first, or this trains them) with λ of task arithmetic and TIES chosen on the
validation splits from ``--grid``, full-weight and (``--adapter``) adapter-space at rank
``--rank``, and prints the table. Run by hand (≈ 10 min on 2 cores with the fine-tunes cached)::

    OMP_NUM_THREADS=1 python benchmarks/llm_merge_tuning.py --methods ties --grid 0.7,1.0,1.3
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="0.5,0.7,1.0,1.5")
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--adapter", default="", help="methods also merged in adapter space")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    from splice.bench.llm import LLM_PROFILES, run_llm
    from splice.bench.llm_report import markdown, print_llm_table

    methods = tuple(args.methods.split(","))
    cfg = LLM_PROFILES["quick"].model_copy(
        update={
            "methods": methods,
            "adapter_methods": tuple(m for m in args.adapter.split(",") if m),
            "adapter_rank": args.rank,
            "emr": False,
            "lambda_grid": tuple(float(x) for x in args.grid.split(",")),
        }
    )
    results = run_llm(cfg, say=lambda line: print(line, file=sys.stderr, flush=True))
    print_llm_table(results, Console(width=200))
    print(markdown(results))


if __name__ == "__main__":
    main()
