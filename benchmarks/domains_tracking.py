"""LoRAT vs full fine-tuning, and SEATrack's AMG-LoRA vs plain two-stream LoRA, on synthetic
RGB + thermal digit sequences (issue #34; splice.bench.domains.tracking says what runs).

Prints each row (success AUC, precision, frames/s, trainable parameters, step time) and the
ratios the issue's targets name. Cached: the pretrained ViT (``<cache>/domains``).

    OMP_NUM_THREADS=1 python benchmarks/domains_tracking.py                  # ~6 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/domains_tracking.py --pretrain-steps 1000 --steps 1000 \
        --seatrack-steps 600
"""

from __future__ import annotations

import time

from _domains import bars, parser, record, settings


def main() -> None:
    from splice.bench.domains.tracking import TrackingBench, run_tracking

    args = parser(__doc__, TrackingBench()).parse_args()
    started = time.perf_counter()
    result = run_tracking(settings(args, TrackingBench()))
    rows = result["rows"]
    full, lorat = rows["full"], rows["lorat"]
    print("\n| row | AUC | precision | AUC dark | frames/s | trainable | step ms (wall / CPU) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "auc" not in r:
            continue
        step = r.get("step")
        ms = f"{1e3 * step['wall']:.0f} / {1e3 * step['cpu']:.0f}" if step else ""
        dark = 100 * r.get("auc_dark", float("nan"))
        print(
            f"| {name} | {100 * r['auc']:.1f} | {100 * r['precision']:.1f} | {dark:.1f} | "
            f"{r['fps']:.0f} | {r['params']:,} | {ms} |"
        )
    cpu = {k: rows[k]["step"]["cpu"] for k in ("full", "lorat", "lorat_unfused")}
    print(f"\nLoRAT − full: {100 * (lorat['auc'] - full['auc']):+.1f} AUC points (target ≥ −2)")
    print(f"LoRAT / full trainable: {100 * lorat['params'] / full['params']:.1f} % (target < 10 %)")
    print(
        f"LoRAT / full CPU per step: fused {cpu['lorat'] / cpu['full']:.2f}×, "
        f"unfused {cpu['lorat_unfused'] / cpu['full']:.2f}× (target < 1)"
    )
    amg, plain = rows["amg_lora"], rows["two_stream_lora"]
    print(
        f"AMG-LoRA − two-stream LoRA: {100 * (amg['auc'] - plain['auc']):+.1f} AUC points, "
        f"params {amg['params']:,} vs {plain['params']:,}"
    )
    record(result, args, started)
    if args.plot:
        scored = {k: r for k, r in rows.items() if "auc" in r}
        bars(
            args.plot,
            [
                ("success AUC (%)", {k: 100 * r["auc"] for k, r in scored.items()}),
                ("trainable parameters (k)", {k: r["params"] / 1e3 for k, r in scored.items()}),
                ("CPU ms / training step", {k: 1e3 * v for k, v in cpu.items()}),
            ],
            "tracking on synthetic sequences (issue #34)",
        )


if __name__ == "__main__":
    main()
