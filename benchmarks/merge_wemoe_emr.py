"""EMR-Merging and WEMoE against task arithmetic on the quick text tasks, with their costs.

    PYTHONPATH=. .venv/bin/python benchmarks/merge_wemoe_emr.py [--finetune full]
        [--steps 100] [--router-steps 30] [--lr 1e-3] [--threads 2]

MiniLM-L6 experts of the quick bench's four text tasks (``--finetune full`` by default: WEMoE
routes the feed-forward task vectors — BERT's ``intermediate`` and ``output`` blocks — which
LoRA on query/value leaves at zero), seed 0, val 150 / test
400 examples per task. Rows: each expert on its own task (the reference of the normalized
column), task arithmetic at λ = 0.3 (FusionBench's fixed value), EMR-Merging (each task's
model rebuilt from the unified vector, its mask and rescaler), and WEMoE before training
(routing = task arithmetic), with routers trained by entropy on the tasks' *validation*
inputs (not the paper's test-time adaptation on test inputs), and by cross-entropy on the
validation labels. Extra columns: stored parameters
beyond one dense model and the seconds of one evaluation pass relative to the dense model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from splice.bench.finetune import FinetuneConfig, finetune_cached
from splice.data.encoders import load_encoder
from splice.data.registry import TASKS, Caps, load_task
from splice.merge.fusion.emr import emr_merge
from splice.merge.fusion.wemoe import cost, upcycle
from splice.merge.learned._functional import TaskVectors
from splice.train.wemoe import train_routers

QUICK = ("rt_sentiment", "tweet_sentiment", "fortune_topic", "wordnet_supersense")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune", default="full")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--router-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3, help="router Adam learning rate")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enc = load_encoder("text", max_len=32)
    cfg = FinetuneConfig(finetune=args.finetune, steps=args.steps)
    data = {t: load_task(TASKS.get(t), Caps(2000, 150, 400), 0) for t in QUICK}
    runs = {t: finetune_cached(enc, d, cfg, 0)[0] for t, d in data.items()}
    tv = TaskVectors.build(enc.module, {t: r.deltas for t, r in runs.items()})
    deltas = {t: {n: tv.stacked[n][i] for n in tv.names} for i, t in enumerate(tv.tasks)}
    test = {t: (enc.prepare(d.test.x), torch.from_numpy(d.test.y)) for t, d in data.items()}
    cpu = torch.device("cpu")

    def accuracy(task: str, weights=None, module=None) -> tuple[float, float]:
        x, y = test[task]
        hits, start = 0, time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(x), 128):
                idx = np.arange(s, min(s + 128, len(x)))
                f = enc.features(x.batch(idx, cpu), weights=weights, module=module)
                hits += int((runs[task].head(f).argmax(-1) == y[idx]).sum())
        return 100 * hits / len(x), time.perf_counter() - start

    rows: dict[str, dict[str, float]] = {}
    expert = {t: accuracy(t, {n: tv.base[n] + deltas[t][n] for n in tv.names}) for t in QUICK}
    dense_s = sum(s for _, s in expert.values())
    rows["individual"] = {t: a for t, (a, _) in expert.items()}
    ta = {n: tv.base[n] + 0.3 * sum(deltas[t][n] for t in QUICK) for n in tv.names}
    rows["task arithmetic λ=0.3"] = {t: accuracy(t, ta)[0] for t in QUICK}
    emr = emr_merge(deltas)
    rows["EMR-Merging"] = {t: accuracy(t, emr.weights(tv.base, t))[0] for t in QUICK}
    extra = {"EMR-Merging": emr.extra_params(), "task arithmetic λ=0.3": 0}
    seconds = {"EMR-Merging": 1.0, "task arithmetic λ=0.3": 1.0}
    ffn = r"layer\.\d+\.(intermediate|output)$"  # BERT's two feed-forward halves
    val = {t: enc.prepare(d.val.x) for t, d in data.items()}
    parts = [val[t].batch(np.arange(len(val[t])), cpu) for t in QUICK]
    pool = {k: torch.cat([_pad(p[k], 32) for p in parts]) for k in parts[0]}
    offsets = np.cumsum([0] + [len(val[t]) for t in QUICK])
    rows_of = {t: torch.arange(offsets[i], offsets[i + 1]) for i, t in enumerate(QUICK)}
    labels = {t: torch.from_numpy(d.val.y) for t, d in data.items()}
    variants = [("untrained routers", None, 0.0), ("entropy, val inputs", "entropy", args.lr)]
    variants.append(("cross-entropy, val labels", "ce", args.lr))
    for label, objective, lr in variants:
        label = f"WEMoE ({label})"
        moe = upcycle(enc.module, deltas, init_lambda=0.3, pattern=ffn)
        moe.eval()
        if objective is not None:
            start = time.perf_counter()  # routers see global row indices; forward picks rows
            losses = train_routers(
                moe,
                rows_of,
                {t: runs[t].head for t in QUICK},
                labels=labels,
                objective=objective,
                forward=lambda m, i: enc.features(_rows(pool, i), module=m),
                steps=args.router_steps,
                lr=lr,
                batch_size=16,
            )
            print(f"{label}: {len(losses)} steps, lr {lr}, loss {losses[0]:.3f} → "
                  f"{losses[-1]:.3f}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        accs = {t: accuracy(t, module=moe) for t in QUICK}
        rows[label] = {t: a for t, (a, _) in accs.items()}
        extra[label] = cost(moe)["extra"]
        seconds[label] = sum(s for _, s in accs.values()) / dense_s
    print(
        "| method | " + " | ".join(QUICK) + " | avg | normalized % | extra params | eval time × |"
    )
    print("|---|" + "---:|" * (len(QUICK) + 4))
    ref = rows["individual"]
    for label, accs in rows.items():
        avg = float(np.mean([accs[t] for t in QUICK]))
        norm = float(np.mean([100 * accs[t] / ref[t] for t in QUICK]))
        cells = " | ".join(f"{accs[t]:.1f}" for t in QUICK)
        more = f"{extra.get(label, 0):,.0f} | {seconds.get(label, 1.0):.2f}"
        print(f"| {label} | {cells} | {avg:.1f} | {norm:.1f} | {more} |")


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _rows(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    sub = {k: v[idx] for k, v in batch.items()}
    keep = int(sub["attention_mask"].sum(1).max())
    return {k: v[:, :keep] for k, v in sub.items()}


if __name__ == "__main__":
    main()
