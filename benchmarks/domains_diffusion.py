"""HyperAlign vs reward fine-tuning and best-of-N sampling on a small class-conditional DDPM
of MNIST digits (issue #34; splice.bench.domains.diffusion says what runs).

Prints mean reward, sample diversity, sampling CPU seconds and trainable parameters per row,
and HyperAlign's reward beside best-of-N's at (about) its sampling cost. Cached: the
pretrained denoiser and the reward classifier (``<cache>/domains``).

    OMP_NUM_THREADS=1 python benchmarks/domains_diffusion.py                 # ~8 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/domains_diffusion.py --pretrain-steps 3000 --align-steps 300
"""

from __future__ import annotations

import time

from _domains import bars, parser, record, settings


def main() -> None:
    from splice.bench.domains.diffusion import DiffusionBench, run_diffusion

    args = parser(__doc__, DiffusionBench()).parse_args()
    started = time.perf_counter()
    result = run_diffusion(settings(args, DiffusionBench()))
    rows = result["rows"]
    base_s = rows["base"]["sample_seconds"]
    print("\n| row | mean reward | diversity | sampling cost (× base) | trainable |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['reward']:.3f} | {r['diversity']:.3f} | "
            f"{r['sample_seconds'] / base_s:.2f} | {r['params']:,} |"
        )
    ha = rows["hyperalign_S"]
    cost = ha["sample_seconds"] / base_s
    peers = [k for k in rows if k.startswith("best_of_")]
    n = min(peers, key=lambda k: abs(rows[k]["sample_seconds"] / base_s - cost))
    print(f"\nHyperAlign-S costs {cost:.2f}× a base sample; nearest best-of-N: {n}")
    print(
        f"HyperAlign-S − {n}: {ha['reward'] - rows[n]['reward']:+.3f} reward "
        f"(diversity {ha['diversity']:.3f} vs {rows[n]['diversity']:.3f})"
    )
    record(result, args, started)
    if args.plot:
        bars(
            args.plot,
            [
                ("mean reward", {k: r["reward"] for k, r in rows.items()}),
                ("diversity (RMS px distance)", {k: r["diversity"] for k, r in rows.items()}),
                (
                    "sampling cost (× base)",
                    {k: r["sample_seconds"] / base_s for k, r in rows.items()},
                ),
            ],
            "diffusion alignment on MNIST (issue #34)",
        )


if __name__ == "__main__":
    main()
