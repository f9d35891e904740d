"""Point-PEFT vs full fine-tuning and LoRA at its parameter count (issue #34, item 3).

    flock /tmp/splice-heavy.lock python benchmarks/domains_points.py [--steps 300]
        [--pretrain-steps 600] [--study] [--json out.json] [--plot docs/img/domains-points.png]

A point transformer (:mod:`splice.domains.backbones.points`) pretrained on primitive shapes
(cached), adapted to mnist_5k digits as 3-D clouds (4,000 train / 1,000 test), seed 0; see
:mod:`splice.bench.domains.points`. Rows: ``full`` (every parameter, lr ``--full-lr``),
``lora`` (qkv/proj of every block, rank matched to Point-PEFT's count), ``point-peft``,
``linear`` (a new head only). ``--study`` adds Point-PEFT variants (no memory bank, no
prompts, no neighbourhood term, other learning rates) and LoRA at a higher LR, to see why
one trails the other. Prints a table with each row's difference to full fine-tuning.
"""

from __future__ import annotations

import time

import torch

torch.set_num_threads(1)


def main() -> None:
    from splice.bench.domains.common import parse_setup, report
    from splice.bench.domains.points import METHODS, PointsSetup, digits, pretrained, run_method

    setup, args = parse_setup(__doc__, PointsSetup(), METHODS)
    start = time.perf_counter()
    backbone, facts = pretrained(setup)
    how = "cached" if facts["cached"] else f"{facts['seconds']:.0f} s"
    print(f"backbone: {facts['accuracy']:.1f}% on held-out primitives ({how})", flush=True)
    data = digits(setup)
    runs = [(m, m, {}) for m in args.methods]
    if args.study:
        runs += [
            ("point-peft", "pp no bank", {"bank": False}),
            ("point-peft", "pp no prompts", {"tokens": 0}),
            ("point-peft", "pp no kNN (k=1)", {"k": 1}),
            ("point-peft", "pp lr×3", {"lr": 3 * setup.lr}),
            ("point-peft", "pp lr×10", {"lr": 10 * setup.lr}),
            ("lora", "lora lr×3", {"lr": 3 * setup.lr}),
        ]
    rows = []
    for method, name, opts in runs:
        rows.append(run_method(method, setup, backbone, data, name=name, **opts))
        r = rows[-1]
        print(f"{name}: {r.score:.2f} ({r.trainable:,} trainable, {r.seconds:.0f} s)", flush=True)
    report(rows, facts, setup, args, "full", "Point-PEFT on digit clouds")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
