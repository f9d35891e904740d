"""TAP-SLF and Polyhistor(-Lite) vs per-task adapters and full multi-task fine-tuning
(issue #34, item 4).

    flock /tmp/splice-heavy.lock python benchmarks/domains_dense.py [--steps 400]
        [--pretrain-steps 800] [--json out.json] [--plot docs/img/domains-dense.png]

A hierarchical backbone (:mod:`splice.domains.backbones.hier`) pretrained on garments
(cached), adapted to four tasks on cluttered digits (mask, saliency, edges, class; 4,000
train / 1,000 test), tasks in turn, seed 0; see :mod:`splice.bench.domains.dense`. Rows:
``full``, ``per-task`` (a private bottleneck adapter per task and block, width/8),
``polyhistor``, ``polyhistor-lite``, ``tap-slf`` (its ``prompts removed`` column: the same
model scored with the prompts taken out) and ``tap-slf-noprompt`` (trained without them).
The score is the mean of the four task scores; the table gives each row's difference to
per-task adapters and its trainable parameters, with and without the task heads, as % of
per-task adapters'. ``--study`` adds TAP-SLF with ``fidelity="code"``.
"""

from __future__ import annotations

import time

import torch

torch.set_num_threads(1)


def main() -> None:
    from splice.bench.domains.common import parse_setup, report
    from splice.bench.domains.dense import METHODS, DenseSetup, data, pretrained, run_method

    setup, args = parse_setup(__doc__, DenseSetup(), METHODS)
    start = time.perf_counter()
    backbone, facts = pretrained(setup)
    how = "cached" if facts["cached"] else f"{facts['seconds']:.0f} s"
    print(f"backbone: {facts['accuracy']:.1f}% on held-out garments ({how})", flush=True)
    d = data(setup)
    runs = [(m, m, {}) for m in args.methods]
    if args.study:
        runs.append(("tap-slf", "tap-slf code", {"fidelity": "code"}))
    rows = []
    for method, name, opts in runs:
        rows.append(run_method(method, setup, backbone, d, name=name, **opts))
        r = rows[-1]
        tasks = ", ".join(f"{k} {v:.1f}" for k, v in r.detail.items())
        print(f"{name}: {r.score:.2f} ({tasks}; {r.trainable:,} trainable, {r.seconds:.0f} s)")
    ref = "per-task" if "per-task" in args.methods else rows[0].method
    report(rows, facts, setup, args, ref, "Multi-task dense adapters")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
