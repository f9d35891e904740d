"""Accuracy against size (fraction of FP32) for post-training quantization (issue #28).

    python benchmarks/quantize_accuracy.py [--tasks sk_digits,rt_sentiment] [--samples 256]
        [--iters 100] [--sizes 0.13,0.19,0.25] [--rows fp32,rtn-w8,...] [--out FILE.jsonl]

Per task: the bench's fine-tuned checkpoint (EfficientNet-Lite0 at 32×32 for image tasks,
all-MiniLM-L6-v2 mean-pooled for text tasks; LoRA r=8 on the encoder's default targets, 100
steps, plus a linear head: ``splice.bench.finetune_cached``), quantized whole (head included)
on the first ``--samples`` training examples and scored on the test split (≤ 500). Rows:

* ``fp32``: the fine-tuned model.
* ``rtn-w8``/``rtn-w4``: round to nearest, per output channel, min/max range, every layer,
  inputs float (the light pipeline with no activation quantization, no BN step, no ends).
* ``torch-dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 Linear layers only; a
  user's first reach — on EfficientNet it quantizes the head alone).
* ``light-w4a8``/``advanced-w4a8``: W4A8, first and last layer 8-bit; light = min/max + BN
  re-estimation; advanced = sequential AdaQuant (``--iters`` per layer) + BN + bias tuning;
  ``advanced-parallel-w4a8``: the same with parallel AdaQuant.
* ``ip-C``: the light pipeline's integer program at size ``C`` (options 2/4/8 bits, A8;
  with 8-bit ends and 4 bits at least, EfficientNet-Lite0 cannot go below 0.144).

Each finished row is appended as one JSON line to ``--out``; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splice.bench.finetune import FinetuneConfig, apply_deltas, finetune_cached
from splice.compress import AdaQuantConfig, QuantizeConfig, quantize
from splice.data.encoders import load_encoder
from splice.data.registry import TASKS, load_task
from splice.train.loop import minimise


class Classifier(nn.Module):
    """A bench encoder's module with a task head: batch → logits (the pooling of
    ``splice.data.encoders``: a text encoder's mean over tokens; the image net's own)."""

    def __init__(self, text: bool, body: nn.Module, head) -> None:
        super().__init__()
        self.text = text
        self.body = body
        self.head = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        self.head.weight.data.copy_(head.weight)
        self.head.bias.data.copy_(head.bias)

    def forward(self, batch):
        if not self.text:
            return self.head(self.body(batch))
        h = self.body(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def _run(model: nn.Module, batch):
    return model(batch)


def _batches(prepared, n: int, size: int) -> list:
    order = np.arange(min(n, len(prepared)))
    return [
        prepared.batch(order[i : i + size], torch.device("cpu")) for i in range(0, len(order), size)
    ]


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list, labels: np.ndarray) -> float:
    preds = torch.cat([model(b).argmax(-1) for b in batches]).numpy()
    return float((preds == labels).mean())


def _rows(args: argparse.Namespace) -> dict[str, QuantizeConfig | None]:
    fast = AdaQuantConfig(iters=args.iters, batch=50)
    light = {"pipeline": "light", "adaquant": fast}
    rows: dict[str, QuantizeConfig | None] = {
        "fp32": None,
        "rtn-w8": QuantizeConfig(bits=8, a_bits=None, ends_bits=None, bn=False, **light),
        "rtn-w4": QuantizeConfig(bits=4, a_bits=None, ends_bits=None, bn=False, **light),
        "torch-dynamic": None,
        "light-w4a8": QuantizeConfig(bits=4, **light),
        "advanced-w4a8": QuantizeConfig(bits=4, adaquant=fast, bias_steps=args.bias_steps),
        "advanced-parallel-w4a8": QuantizeConfig(
            bits=4, adaquant=fast, bias_steps=args.bias_steps, mode="parallel"
        ),
    }
    for c in args.sizes.split(","):
        rows[f"ip-{c}"] = QuantizeConfig(size=float(c), options=(2, 4, 8), **light)
    return rows


def _dynamic_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return (total - linear + linear / 4) / total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="sk_digits,rt_sentiment")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--bias-steps", type=int, default=100)
    p.add_argument("--sizes", default="0.13,0.19,0.25")
    p.add_argument("--rows", default="")
    p.add_argument("--out", type=Path, default=Path("bench-out/quantize_accuracy.jsonl"))
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = _rows(args)
    wanted = [r for r in args.rows.split(",") if r] or list(rows)
    results = []
    for task_name in args.tasks.split(","):
        task = TASKS.get(task_name)
        encoder = load_encoder(task.modality)
        data = load_task(task)
        start = time.perf_counter()
        run, _ = finetune_cached(encoder, data, FinetuneConfig(steps=100), seed=0)
        body = copy.deepcopy(encoder.module)
        body.load_state_dict(apply_deltas(encoder.module.state_dict(), run.deltas), strict=False)
        model = Classifier(task.modality == "text", body, run.head).eval()
        print(f"{task_name}: fine-tuned checkpoint ready ({time.perf_counter() - start:.0f} s)")
        calib = _batches(encoder.prepare(data.train.x), args.samples, 50)
        test = _batches(encoder.prepare(data.test.x), len(data.test.x), 100)
        for row in wanted:
            cfg, start = rows[row], time.perf_counter()
            if row == "fp32":
                q, fraction = model, 1.0
            elif row == "torch-dynamic":
                q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
                fraction = _dynamic_fraction(model)
            else:
                q, report = quantize(model, calib, _run, minimise, cfg)
                fraction = report.fraction
            seconds = time.perf_counter() - start
            acc = _accuracy(q, test, data.test.y)
            result = {"task": task_name, "row": row, "accuracy": acc, "fraction": fraction,
                      "calibration_s": round(seconds, 1), "samples": args.samples,
                      "iters": args.iters}  # fmt: skip
            results.append(result)
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{task_name:14s} {row:24s} acc {acc:.4f} size {fraction:.4f} ({seconds:.0f} s)")
    print("\n| task | row | accuracy | size (of FP32) | calibration s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['row']} | {100 * r['accuracy']:.1f} | {r['fraction']:.3f}"
              f" | {r['calibration_s']} |")  # fmt: skip


if __name__ == "__main__":
    main()
