"""Cost of RegMean's and Fisher's statistics pass against one evaluation pass, per task.

    PYTHONPATH=. .venv/bin/python benchmarks/merge_stats_cost.py [--threads 1]

The quick bench's text setting (MiniLM-L6 + the cached LoRA fine-tunes of ``splice bench
--quick``, seed 0; val 150 / test 400 examples per task): per task, the seconds of one
evaluation pass (the expert's features and head over the test split in batches of 128, as
the bench evaluates) beside the seconds of RegMean's Gram pass (every linear layer hooked,
over the 150 validation inputs, ``info["stats_seconds"]``) and of Fisher's pass (64
examples, one forward and backward each). The target (issue #32): statistics ≤ one
evaluation pass per task.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from splice.bench.finetune import FinetuneConfig, finetune_cached
from splice.data.encoders import load_encoder
from splice.data.registry import TASKS, Caps, load_task
from splice.merge.learned import fisher, regmean
from splice.merge.learned._functional import Network, TaskVectors

QUICK = ("rt_sentiment", "tweet_sentiment", "fortune_topic", "wordnet_supersense")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default=",".join(QUICK))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enc = load_encoder("text", max_len=32)
    fwd = lambda module, batch: enc.features(batch, module=module)  # noqa: E731
    rows = lambda b: b["attention_mask"]  # noqa: E731
    print(
        "| task | eval pass s (400 test) | RegMean stats s (150 val) | ratio "
        "| Fisher stats s (64) | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.tasks.split(","):
        td = load_task(TASKS.get(name), Caps(2000, 150, 400), 0)
        run = finetune_cached(enc, td, FinetuneConfig(), 0)[0]
        tv = TaskVectors.build(enc.module, {name: run.deltas})
        expert = {n: tv.base[n] + tv.stacked[n][0] for n in tv.names}
        test = enc.prepare(td.test.x)
        start = time.perf_counter()
        net = Network(enc.module, fwd)
        with torch.no_grad():
            for s in range(0, len(test), 128):
                b = test.batch(np.arange(s, min(s + 128, len(test))), torch.device("cpu"))
                run.head(net.features(expert, b)).argmax(-1)
        eval_s = time.perf_counter() - start
        val = enc.prepare(td.val.x)
        rm = regmean(enc.module, {name: run.deltas}, {name: val}, forward=fwd, rows=rows)
        heads = {name: run.head}
        fi = fisher(enc.module, {name: run.deltas}, {name: val}, heads=heads, forward=fwd)
        r, f = rm.info["stats_seconds"], fi.info["stats_seconds"]
        cells = f"{eval_s:.2f} | {r:.2f} | {r / eval_s:.2f} | {f:.2f} | {f / eval_s:.2f}"
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
