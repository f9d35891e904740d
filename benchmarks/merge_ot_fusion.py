"""OT fusion vs plain weight averaging of two MLPs trained from different initialisations.

    PYTHONPATH=. .venv/bin/python benchmarks/merge_ot_fusion.py [--tasks fashion_mnist,mnist_5k]
        [--steps 300] [--hidden 128] [--threads 2]

Per image task: two MLPs (784 → h → h → LayerNorm → classes) trained from two seeds through
the one training loop (``splice.train.loop.minimise``), then one-shot (no fine-tuning after
fusion) test accuracy of each parent, of their weight average (what task arithmetic would do
without a shared base), and of OT fusion (``splice.merge.fusion.ot_fusion.ot_fuse``) with exact
EMD and Sinkhorn on activation costs (200 training images), with weight costs, and of a
parent of width 1.5·h fused into the anchor's width. The last column is the ratio to the
average (merging.md §13.8: OT fusion beats vanilla averaging one-shot).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from splice.data.registry import TASKS, Caps, load_task
from splice.merge.fusion.ot_fusion import ot_fuse
from splice.train.loop import minimise


def mlp(width: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width),
        nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, classes),
    )  # fmt: skip


def images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32) / 127.5 - 1.0)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def loss(step: int) -> tuple[torch.Tensor, int]:
        idx = torch.from_numpy(rng.integers(0, len(y), 64))
        return nn.functional.cross_entropy(model(x[idx]), y[idx]), 64

    minimise(loss, torch.optim.Adam(model.parameters(), lr=1e-3), steps)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean()) * 100


def average(a: nn.Module, b: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(a)
    with torch.no_grad():
        for p, q in zip(out.parameters(), b.parameters(), strict=True):
            p.copy_((p + q) / 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="fashion_mnist,mnist_5k")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cols = ["parent A", "parent B", "average", "OT emd", "OT sinkhorn", "OT weights", "OT wide B"]
    print(f"| task | {' | '.join(cols)} | best OT / average |")
    print(f"|---|{'---|' * len(cols)}---|")
    for name in args.tasks.split(","):
        start = time.perf_counter()
        data = load_task(TASKS.get(name), Caps(train=3000, val=200, test=1000), seed=0)
        xtr, ytr = images(data.train.x), torch.from_numpy(data.train.y)
        xte, yte = images(data.test.x), torch.from_numpy(data.test.y)
        k = len(data.classes)
        a, b = mlp(args.hidden, k, 1), mlp(args.hidden, k, 2)
        wide = mlp(args.hidden * 3 // 2, k, 3)
        for seed, m in enumerate((a, b, wide)):
            train(m, xtr, ytr, args.steps, seed)
            m.eval()
        probe = xtr[:200]
        row = {
            "parent A": accuracy(a, xte, yte),
            "parent B": accuracy(b, xte, yte),
            "average": accuracy(average(a, b), xte, yte),
            "OT emd": accuracy(ot_fuse([a, b], probe, solver="emd").model, xte, yte),
            "OT sinkhorn": accuracy(ot_fuse([a, b], probe, solver="sinkhorn").model, xte, yte),
            "OT weights": accuracy(
                ot_fuse([a, b], None, cost="weights", solver="emd").model, xte, yte
            ),
            "OT wide B": accuracy(ot_fuse([a, wide], probe, solver="emd").model, xte, yte),
        }
        best = max(row[c] for c in cols[3:6])
        cells = " | ".join(f"{row[c]:.1f}" for c in cols)
        print(f"| {name} | {cells} | {best / max(row['average'], 1e-9):.2f}× |", flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
