"""TAP-SLF and Polyhistor(-Lite) vs per-task adapters and full multi-task fine-tuning
(issue #34, item 4).

    flock /tmp/splice-heavy.lock python benchmarks/domains_dense.py [--steps 400]
        [--pretrain-steps 800] [--out out.json] [--plot docs/img/domains-dense.png]

A hierarchical backbone (:mod:`splice.domains.backbones.hier`) pretrained on garments
(cached), adapted to four tasks on cluttered digits (mask, saliency, edges, class; 4,000
train / 1,000 test), tasks in turn, seed 0; see :mod:`splice.bench.domains.dense`. Rows:
``full``, ``per-task`` (a private bottleneck adapter per task and block, width/8),
``polyhistor``, ``polyhistor-lite``, ``tap-slf`` (its ``prompts removed`` column: the same
model scored with the prompts taken out) and ``tap-slf-noprompt`` (trained without them).
The score is the mean of the four task scores; the table gives each row's difference to
per-task adapters and its trainable parameters, with and without the task heads, as % of
per-task adapters'. ``--lr-grid 1,3`` trains each method at those multiples of its LR and
keeps the best on the validation images (the last 500 of the training 4,000, held out);
``--study`` adds TAP-SLF with ``fidelity="code"`` at TAP-SLF's chosen LR.
"""

from __future__ import annotations

import time

import torch

torch.set_num_threads(1)


def main() -> None:
    from _domains import parser, settings

    from splice.bench.domains.common import grid_options, report, run_study
    from splice.bench.domains.dense import METHODS, DenseSetup, data, pretrained, run_method

    args = grid_options(parser(__doc__, DenseSetup()), METHODS).parse_args()
    setup = settings(args, DenseSetup())
    start = time.perf_counter()
    bench = (pretrained, data, run_method)
    facts, every, rows, again = run_study(
        setup, args.methods, args.lr_grid, bench, "garments", log=lambda s: print(s, flush=True)
    )
    if args.study and "tap-slf" in args.methods:
        again("tap-slf", "tap-slf code", fidelity="code")
    ref = "per-task" if "per-task" in args.methods else rows[0].method
    report(rows, facts, setup, args, ref, "Multi-task dense adapters", every)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
