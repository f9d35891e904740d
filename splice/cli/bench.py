"""The body of ``splice bench``: configure, run with progress, print and write the report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _split(csv: str | None) -> list[str] | None:
    return [x.strip() for x in csv.split(",") if x.strip()] if csv is not None else None


def bench_command(
    profile: str,
    *,
    suite: str | None = None,
    tasks: str | None = None,
    methods: str | None = None,
    finetune: str | None = None,
    steps: int | None = None,
    device: str | None = None,
    out: Path = Path("bench-out"),
    seed: int | None = None,
    as_json: bool = False,
) -> None:
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads slow
    # EfficientNet's many small ops 10-30x. Only effective before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console

    from splice.bench.report import print_table, write_report
    from splice.bench.runner import configure, run_bench

    cfg = configure(
        profile,
        suite=suite,
        tasks=_split(tasks),
        methods=_split(methods),
        finetune=finetune,
        steps=steps,
        seed=seed,
        device=device,
    )
    err = Console(stderr=True)
    err.print(f"[bold]splice bench[/] {profile}: {', '.join(cfg.tasks)}")
    results = run_bench(cfg, console=err)
    paths = write_report(results, out)
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        # Piped output (CI logs) gets a wide table rather than rich's 80 columns.
        print_table(results, Console() if sys.stdout.isatty() else Console(width=200))
    err.print("wrote " + ", ".join(str(p) for p in paths))
