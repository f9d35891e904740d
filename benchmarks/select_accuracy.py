"""SPT and ID³ vs LoRA at LoRA's trainable budget (issue #23's accuracy targets).

    flock /tmp/splice-heavy.lock python benchmarks/select_accuracy.py [--tasks rt_sentiment|text]
        [--seeds 0,1,2] [--steps 150] [--work bench-out/select_suite] [--minutes M]
        [--rows lora,spt,id3,id3_random]

all-MiniLM-L6-v2 on bench text tasks (``--tasks text``: the bench's six), the settings and
the resumable loop of ``benchmarks/select_common.py``, rows:

- ``lora``: LoRA r=8, α=16 on query/value of all 6 layers (73,728 parameters);
- ``spt``: ``--select spt --budget 73728`` (sensitivity over 16 batches, α=10, r=8, over
  every linear weight of the 6 layers; precision ``auto``);
- ``id3``: ``--select id3 --budget 73728`` (T = half the steps, ε=1e-3, β=0);
- ``id3_random``: the same with ``--select-set mask=random``: a static random mask of the
  same 73,728 entries, drawn at the first step (issue #23: ID³ ≥ a static random mask).

Per task: test accuracy per seed, mean and sample standard deviation; then the suite
average and SPT − LoRA, ID³ − random mask. The ``lora`` runs are ``rdp_layers.py``'s ``all``
row (same directory under the same ``--work``).
"""

from __future__ import annotations

from select_common import arguments, study, tables

BUDGET = 6 * 2 * 8 * (384 + 384)
_SEL = {"budget": BUDGET, "targets": None, "adapter": {}}
ROWS = {
    "lora": lambda seed: ("lora", {}),
    "spt": lambda seed: ("spt", {"select": "spt", **_SEL}),
    "id3": lambda seed: ("id3", {"select": "id3", **_SEL}),
    "id3_random": lambda seed: (
        "id3_random",
        {"select": "id3", **_SEL, "select_options": {"mask": "random"}},
    ),
}


def main() -> None:
    ap = arguments(__doc__, "bench-out/select_suite")
    ap.add_argument("--rows", default="lora,spt,id3,id3_random")
    args = ap.parse_args()
    rows = {r: ROWS[r] for r in args.rows.split(",")}
    done = study(args, rows)
    pairs = tuple(
        p for p in (("spt", "lora"), ("id3", "lora"), ("id3", "id3_random")) if set(p) <= set(rows)
    )
    print(f"\nbudget {BUDGET}, {args.steps} steps")
    tables(done, pairs=pairs)


if __name__ == "__main__":
    main()
