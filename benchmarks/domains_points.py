"""Point-PEFT vs full fine-tuning and LoRA at its parameter count (issue #34, item 3).

    flock /tmp/splice-heavy.lock python benchmarks/domains_points.py [--steps 300]
        [--pretrain-steps 600] [--study] [--out out.json] [--plot docs/img/domains-points.png]

A point transformer (:mod:`splice.domains.backbones.points`) pretrained on primitive shapes
(cached), adapted to mnist_5k digits as 3-D clouds (4,000 train / 1,000 test), seed 0; see
:mod:`splice.bench.domains.points`. Rows: ``full`` (every parameter, lr ``--full-lr``),
``lora`` (qkv/proj of every block, rank matched to Point-PEFT's count), ``point-peft``,
``linear`` (a new head only). ``--lr-grid 1,3,10`` trains each method at those multiples of
its LR (``--lr``; full fine-tuning ``--full-lr``) and keeps the best on the validation
clouds (the last 500 of the training 4,000, held out). ``--study`` then adds Point-PEFT
without its memory bank, without prompts and without the neighbourhood term (k = 1) at its
chosen LR. Prints a table with each row's difference to full fine-tuning.
"""

from __future__ import annotations

import time

import torch

torch.set_num_threads(1)


def main() -> None:
    from _domains import parser, settings

    from splice.bench.domains.common import grid_options, report, run_study
    from splice.bench.domains.points import METHODS, PointsSetup, digits, pretrained, run_method

    args = grid_options(parser(__doc__, PointsSetup()), METHODS).parse_args()
    setup = settings(args, PointsSetup())
    start = time.perf_counter()
    bench = (pretrained, digits, run_method)
    facts, every, rows, again = run_study(
        setup, args.methods, args.lr_grid, bench, "primitives", log=lambda s: print(s, flush=True)
    )
    if args.study and "point-peft" in args.methods:
        again("point-peft", "pp no bank", bank=False)
        again("point-peft", "pp no prompts", tokens=0)
        again("point-peft", "pp no kNN (k=1)", k=1)
    ref = "full" if "full" in args.methods else rows[0].method
    report(rows, facts, setup, args, ref, "Point-PEFT on digit clouds", every)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
