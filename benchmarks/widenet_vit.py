"""WideNet vs ViT vs ViT-MoE trained from scratch on the offline image tasks (issue #27,
spec peft.md §9): test accuracy and parameters at equal steps.

All three share depth, width, heads, FFN width and (for the MoE kinds) 4 experts; each
trains ``--steps`` AdamW steps (batch ``--batch``, LR ``--lr`` with warmup then linear decay,
grad clip 1) through :func:`splice.train.loop.fit`, seed 0. Tasks and splits come from
:func:`splice.data.registry.load_task` (default caps: ≤ 2,000 train, ≤ 500 test images).
Images are scaled to [0, 1]; 28×28 images use 7×7 patches, 8×8 images 2×2 (16 tokens).

    python benchmarks/widenet_vit.py --steps 300    # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("vit", "vit-moe", "widenet")


def images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)[:, None]


def run(task: str, kind: str, args) -> dict:
    from splice.convert.widenet import ViTConfig, WideNet
    from splice.data.registry import TASKS, load_task
    from splice.train.loop import TrainStep, fit
    from splice.train.schedule import linear_warmup_decay

    data = load_task(TASKS.get(task))
    train_x, train_y = images(data.train.x), torch.from_numpy(data.train.y)
    test_x, test_y = images(data.test.x), torch.from_numpy(data.test.y)
    size = train_x.shape[-1]
    cfg = ViTConfig(
        kind=kind, image_size=size, patch=7 if size == 28 else 2, dim=args.dim,
        depth=args.depth, hidden=2 * args.dim, classes=len(data.classes),
    )  # fmt: skip
    torch.manual_seed(0)
    model = WideNet(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(args.steps, args.steps // 10)
    )
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))

    def loss(i: int) -> tuple[torch.Tensor, int]:
        start = (i * args.batch) % len(order)
        idx = order[start : start + args.batch]
        logits, balance = model(train_x[idx])
        return F.cross_entropy(logits, train_y[idx]) + balance, len(idx)

    t0 = time.perf_counter()
    fit(TrainStep(loss, optimizer, scheduler, grad_clip=1.0), args.steps)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [model(test_x[i : i + 256])[0].argmax(-1) for i in range(0, len(test_y), 256)]
        )
    return {
        "accuracy": (pred == test_y).float().mean().item(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="mnist_5k,fashion_mnist,sk_digits")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    results = {kind: {} for kind in KINDS}
    for task in tasks:
        for kind in KINDS:
            results[kind][task] = run(task, kind, args)
            print(f"  {task} {kind}: {results[kind][task]}", flush=True)
    vit = np.mean([results["vit"][t]["accuracy"] for t in tasks])
    vit_params = results["vit"][tasks[0]]["parameters"]
    print(f"\n{args.steps} steps × batch {args.batch}, dim {args.dim}, depth {args.depth}")
    print("| model | " + " | ".join(tasks) + " | mean | params (1st task) | × ViT params |")
    print("| --- |" + " ---: |" * (len(tasks) + 3))
    for kind in KINDS:
        accs = [results[kind][t]["accuracy"] for t in tasks]
        params = results[kind][tasks[0]]["parameters"]
        cells = " | ".join(f"{a:.1%}" for a in accs)
        print(
            f"| {kind} | {cells} | {np.mean(accs):.1%} | {params:,} | {params / vit_params:.2f} |"
        )
    wide = np.mean([results["widenet"][t]["accuracy"] for t in tasks])
    print(f"\nWideNet − ViT mean accuracy: {100 * (wide - vit):+.1f} points")


if __name__ == "__main__":
    main()
