"""Paper protocol, vision: does layer-wise AdaMerging beat task arithmetic once batch norm is
handled? (issue #32's "TA < AdaMerging" ladder step; docs/bench.md).

Runs the quick vision suite of ``splice bench --protocol paper`` (fine-tunes from the bench
cache: run ``splice bench --protocol paper --suite vision`` first, or this trains them) with
only AdaMerging, once per schedule in ``SETTINGS``, and prints one line per schedule: the
average normalized accuracy of the plain row (the stored BN statistics during the fit and in
the merged model) and of the repaired row (coefficients fitted with batch statistics,
``bn="batch"``, then the merged model's BN statistics repaired; splice.bench.bn_repair).
``steps: 0`` is task arithmetic at the initial λ, the point AdaMerging starts from.
About 5 minutes on one core::

    OMP_NUM_THREADS=1 python benchmarks/paper_adamerging_bn.py
"""

from __future__ import annotations

import json
import time

SETTINGS: tuple[dict, ...] = (
    {"steps": 0},
    {"steps": 50, "lr": 1e-2, "batches_per_step": 1},
    {"steps": 50, "lr": 1e-2, "batches_per_step": 1, "mode": "task"},
    {"steps": 0, "init": 1.0},
    {"steps": 50, "lr": 1e-2, "batches_per_step": 1, "init": 1.0, "clamp": False},
)


def main() -> None:
    from splice.bench.paper import PAPER_PROFILES, run_paper
    from splice.bench.report import summarize

    base = PAPER_PROFILES["quick"].model_copy(
        update={
            "tasks": ("fashion_mnist", "mnist_5k", "animal_mnist", "sk_digits"),
            "methods": ("adamerging",),
            "transductive": (),
            "emr": False,
            "wemoe": None,
            "bn_repair": ("adamerging",),
            "lambda_grid": (),
        }
    )
    print("| schedule | plain (stored BN statistics) | bn=batch + BN repair | s |")
    print("| --- | ---: | ---: | ---: |")
    for setting in SETTINGS:
        start = time.perf_counter()
        rows = summarize(run_paper(base.model_copy(update={"schedules": {"adamerging": setting}})))
        norm = {r["key"].endswith("+bn"): 100 * r["avg_norm"][0] for r in rows
                if r["key"].startswith("adamerging")}  # fmt: skip
        secs = time.perf_counter() - start
        print(f"| {json.dumps(setting)} | {norm[False]:.1f} | {norm[True]:.1f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
