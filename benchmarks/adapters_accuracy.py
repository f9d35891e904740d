"""NOLA and MoS against LoRA at 1/8 of its parameters: the PEFT track of ``splice bench``.

    python benchmarks/adapters_accuracy.py [--tasks rt_sentiment,fortune_topic,tweet_sentiment]
                                           [--steps 300] [--seeds 0,1,2,3,4] [--out DIR]

One protocol, one code path: this runs :func:`splice.bench.peft.run_peft` (the protocol
printed in its report: head lr from the linear probe, each row's lr on the validation split
from 5e-4 … 2e-2 with the grid growing past an edge pick, the test split touched once per seed)
with the rows of issue #5's target pinned by ``options``: LoRA r=8 α=16; NOLA r=8, k=l=384
(9,216 coefficients, 1/8 of LoRA's 73,728; the track adapts the encoder's default targets,
query/value, so the old table's all-linear NOLA layout is not run); MoS r=6, e=1, p=0, l=8
without dropout (1/8). Full
fine-tuning and the linear probe come as the track's reference rows; MoLA and EPT are left out
(``--methods`` of ``splice bench --track peft`` runs them). Writes results.json/.md/.png
under ``--out`` and prints the table and whether each row is within 1 point of LoRA on every
task.

The numbers in docs/adapters.md ("Accuracy against LoRA at fewer parameters") were measured by
this script's previous version (a ``splice train`` child per run, ≤ 64 tokens, warmup and
linear decay, the pooler head; ``git show cd97f98:benchmarks/adapters_accuracy.py``), whose
flags the commands there use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "lora": {"r": 8, "alpha": 16},
    "nola": {"r": 8, "k": 384, "l": 384},
    "mos": {"r": 6, "e": 1, "p": 0, "l": 8, "dropout": 0.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="rt_sentiment,fortune_topic,tweet_sentiment")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "adapters_accuracy"))
    args = ap.parse_args()
    from rich.console import Console

    from splice.bench.peft import PEFT_PROFILES, run_peft
    from splice.bench.peft_report import print_peft_table, summarize, write_peft_report

    cfg = PEFT_PROFILES["full"].model_copy(
        update={
            "tasks": tuple(args.tasks.split(",")),
            "methods": tuple(OPTIONS),
            "options": OPTIONS,
            "steps": args.steps,
            "seeds": tuple(int(s) for s in args.seeds.split(",")),
            "lr_grid": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2),
            "grow": 3,
            "caps": (2000, 200, 500),
            # the `--full` profile's settings this study ran with until 2026-12-07 (the
            # profile is smaller since)
            "batch_size": 32,
            "max_len": 40,
            "full_lr_grid": (3e-5, 1e-4),
            "head_lr_grid": (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1),
        }
    )
    results = run_peft(cfg, console=Console(stderr=True))
    write_peft_report(results, Path(args.out))
    print_peft_table(results, Console(width=200))
    rows = {s["key"]: s for s in summarize(results)}
    lora = rows["lora"]["acc"]
    for key in ("nola", "mos"):
        gaps = {t: 100 * (lora[t][0] - a[0]) for t, a in rows[key]["acc"].items()}
        share = rows["lora"]["adapter_params"] / max(1, rows[key]["adapter_params"])
        ok = all(g <= 1.0 for g in gaps.values())
        print(
            f"{key}: 1/{share:.1f} of LoRA's parameters; points behind LoRA "
            + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items())
            + f" → within 1 point on every task: {'yes' if ok else 'no'}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
