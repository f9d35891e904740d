"""Accuracy against size (fraction of FP32) for post-training quantization (issue #28).

    python benchmarks/quantize_accuracy.py [--tasks image|text|all|sk_digits,...] [--rows ...]
        [--samples 256] [--text-samples 128] [--iters 100] [--bias-steps 100]
        [--sizes 0.13,0.16,0.19,0.22,0.25] [--budget-s 480]
        [--store bench-out/quantize_accuracy.json] [--checkpoints bench-out/quantize-checkpoints]
    python benchmarks/quantize_accuracy.py --report [--plot docs/img/quantize-accuracy.png]

Per task: the bench's fine-tuned checkpoint (EfficientNet-Lite0 at 32×32 for the image tasks,
all-MiniLM-L6-v2 mean-pooled for the text tasks; LoRA r=8 on the encoder's default targets,
100 steps, plus a linear head: ``splice.bench.finetune_cached``), quantized whole (head
included) on the first ``--samples`` training examples and scored on the test split (≤ 500).
Rows:

* ``fp32``: the fine-tuned model.
* ``rtn-w8``/``rtn-w4``: round to nearest, per output channel, min/max range, every layer,
  inputs float (the light pipeline with no activation quantization, no BN step, no ends).
* ``torch-dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 Linear layers only; a
  user's first reach — on EfficientNet it quantizes the head alone).
* ``light-w4a8``/``advanced-w4a8``: W4A8, first and last layer 8-bit; light = min/max + BN
  re-estimation; advanced = sequential AdaQuant (``--iters`` per layer) + BN + bias tuning;
  ``advanced-parallel-w4a8``: the same with parallel AdaQuant (float inputs).
* ``ip``: the light pipeline's integer program (options 2/4/8 bits, A8, 8-bit ends) at each
  ``--sizes`` target, one row ``ip-C`` per size; the variants and the sensitivity table are
  made once and shared (``splice.compress.quantize_sizes``), so a row's ``calibration_s`` is
  the shared part plus its own program, BN step and scoring. A size below the smallest
  reachable one is stored as unreachable with that size. ``ip-advanced`` (rows ``ipa-C``):
  the advanced pipeline's program (AdaQuant variants at 2/4/8 bits in parallel mode, BN,
  bias tuning).

Each finished row goes into ``--store`` (JSON) at once and is skipped on the next run, so the
study runs in pieces: ``--budget-s`` stops starting new rows after that many seconds (run the
same command again to continue). The quantizing rows keep each calibrated layer (the ``ip``
rows: its variants, and the sensitivity table) in ``--checkpoints`` as it is made
(``quantize(checkpoint=…)``) and stop between two layers once the budget is spent, so one
row longer than a command may run (``ip-advanced`` at 1,000 samples: 859 s on one thread)
runs as several commands, with the same result; its ``calibration_s`` counts all of them.
``--report`` prints the tables from the store (and SmolLM2's from
``benchmarks/quantize_smollm2.py``'s store) and draws the figure.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
import warnings
from pathlib import Path

import torch
from _quantize import Progress, Store, accuracy, batches, samples_for, suite_tasks, task_model
from torch import nn

from splice.compress import (
    AdaQuantConfig,
    QuantizeConfig,
    QuantizeStopped,
    quantize,
    quantize_sizes,
)
from splice.errors import SpliceError
from splice.train.loop import minimise

ROWS = ("fp32", "rtn-w8", "rtn-w4", "torch-dynamic", "light-w4a8", "advanced-w4a8",
        "advanced-parallel-w4a8", "ip", "ip-advanced")  # fmt: skip
LABELS = {"fp32": "FP32", "rtn-w8": "RTN W8", "rtn-w4": "RTN W4", "torch-dynamic":
          "torch dynamic int8", "light-w4a8": "light W4A8", "advanced-w4a8": "advanced W4A8",
          "advanced-parallel-w4a8": "advanced W4A8 (parallel)"}  # fmt: skip


def _run(model: nn.Module, batch):
    return model(batch)


def _configs(args: argparse.Namespace) -> dict[str, QuantizeConfig]:
    fast = AdaQuantConfig(iters=args.iters, batch=50)
    light = {"pipeline": "light", "adaquant": fast}
    return {
        "rtn-w8": QuantizeConfig(bits=8, a_bits=None, ends_bits=None, bn=False, **light),
        "rtn-w4": QuantizeConfig(bits=4, a_bits=None, ends_bits=None, bn=False, **light),
        "light-w4a8": QuantizeConfig(bits=4, **light),
        "advanced-w4a8": QuantizeConfig(bits=4, adaquant=fast, bias_steps=args.bias_steps),
        "advanced-parallel-w4a8": QuantizeConfig(
            bits=4, adaquant=fast, bias_steps=args.bias_steps, mode="parallel"
        ),
        "ip": QuantizeConfig(size=1.0, options=(2, 4, 8), **light),
        "ip-advanced": QuantizeConfig(
            size=1.0, options=(2, 4, 8), adaquant=fast, bias_steps=args.bias_steps
        ),
    }


def _dynamic_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return (total - linear + linear / 4) / total


def _key(args: argparse.Namespace, task: str, row: str) -> str:
    return f"{task}|{row}|n{samples_for(args, task)}|i{args.iters}|b{args.bias_steps}"


def _pending(args: argparse.Namespace, store: Store, task: str) -> list[str]:
    rows = [r for r in args.rows.split(",") if r] or list(ROWS)
    return [r for r in rows if any(_key(args, task, x) not in store for x in _expand(args, r))]


def _expand(args: argparse.Namespace, row: str) -> list[str]:
    """A row's stored names: ``ip-C`` / ``ipa-C`` per size for the integer programs."""
    prefix = {"ip": "ip", "ip-advanced": "ipa"}.get(row)
    return [f"{prefix}-{c}" for c in args.sizes.split(",")] if prefix else [row]


def _resumable(args, task: str, row: str, progress: Progress) -> dict:
    """``quantize``'s checkpoint directory for the row, and its stop after a layer (kept in
    the checkpoint) once the budget is spent."""
    return {"checkpoint": args.checkpoints / _key(args, task, row).replace("|", "-"),
            "should_stop": progress.over_budget}  # fmt: skip


def _ip(args, store, task, model, calib, test, labels, row: str, progress: Progress) -> None:
    """The size sweep: unreachable sizes stored as such, the rest from one shared profile
    (checkpointed per layer in ``--checkpoints``; stops between layers when over budget)."""
    cfg, pre = _configs(args)[row], "ipa" if row == "ip-advanced" else "ip"
    resume = _resumable(args, task, pre, progress)
    todo = sorted(
        float(c) for c in args.sizes.split(",") if _key(args, task, f"{pre}-{c}") not in store
    )
    names = {float(c): c for c in args.sizes.split(",")}
    start = time.perf_counter()
    while todo:
        try:
            for size, q, report in quantize_sizes(model, calib, _run, minimise, cfg, todo,
                                                  **resume):  # fmt: skip
                acc = accuracy(q, test, labels)
                extra = {"bits": [r.bits for r in report.layers], "loss": report.loss}
                _put(args, store, task, f"{pre}-{names[size]}", acc, report.fraction,
                     report.seconds, extra)  # fmt: skip
            return
        except SpliceError as e:
            found = re.search(r"smallest reachable ([\d.]+)", str(e))
            if found is None:
                raise
            least = float(found.group(1))
            for size in [s for s in todo if s <= least]:
                store.put(_key(args, task, f"{pre}-{names[size]}"),
                          {"task": task, "row": f"{pre}-{names[size]}", "unreachable": least,
                           "calibration_s": round(time.perf_counter() - start, 1)})  # fmt: skip
                print(f"{task:18s} {pre}-{names[size]:7s} unreachable: smallest size {least}")
            todo = [s for s in todo if s > least]


def _put(args, store, task, row, acc, fraction, seconds, extra=None) -> None:
    store.put(_key(args, task, row), {
        "task": task, "row": row, "accuracy": acc, "fraction": fraction,
        "calibration_s": round(seconds, 1), "samples": samples_for(args, task), "iters": args.iters,
        "bias_steps": args.bias_steps, "threads": torch.get_num_threads(), **(extra or {}),
    })  # fmt: skip
    print(f"{task:18s} {row:24s} acc {acc:.4f} size {fraction:.4f} ({seconds:.0f} s)", flush=True)


def run(args: argparse.Namespace) -> None:
    store = Store(args.store)
    plan = {t: _pending(args, store, t) for t in suite_tasks(args.tasks)}
    plan = {t: rows for t, rows in plan.items() if rows}
    progress = Progress(sum(map(len, plan.values())), args.budget_s)
    print(f"{progress.total} pieces to run: {plan}", flush=True)
    for task, rows in plan.items():
        if progress.over_budget():
            print(f"budget of {args.budget_s:.0f} s spent: run the same command to go on")
            break
        start = time.perf_counter()
        model, encoder, data = task_model(task)
        print(f"{task}: fine-tuned checkpoint ready ({time.perf_counter() - start:.0f} s)")
        calib = batches(encoder.prepare(data.train.x), samples_for(args, task), 50)
        test = batches(encoder.prepare(data.test.x), len(data.test.x), 100)
        for row in rows:
            if progress.over_budget():
                print(f"budget of {args.budget_s:.0f} s spent: run the same command to go on")
                break
            start = time.perf_counter()
            try:
                _row(args, store, task, row, model, calib, test, data, progress)
            except QuantizeStopped as e:
                print(f"{task} {row}: {e}; budget of {args.budget_s:.0f} s spent: run the same "
                      f"command to go on from {args.checkpoints}", flush=True)  # fmt: skip
                return
            progress.step(f"{task} {row} ({time.perf_counter() - start:.0f} s)")


def _row(args, store, task, row, model, calib, test, data, progress: Progress) -> None:
    if row in ("ip", "ip-advanced"):
        return _ip(args, store, task, model, calib, test, data.test.y, row, progress)
    start = time.perf_counter()
    seconds = None
    if row == "fp32":
        q, fraction, extra = model, 1.0, {}
    elif row == "torch-dynamic":
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
        fraction, extra = _dynamic_fraction(model), {}
    else:
        resume = _resumable(args, task, row, progress)
        q, report = quantize(model, calib, _run, minimise, _configs(args)[row], **resume)
        fraction, extra, seconds = report.fraction, {"loss": report.loss}, report.seconds
    seconds = time.perf_counter() - start if seconds is None else seconds
    _put(args, store, task, row, accuracy(q, test, data.test.y), fraction, seconds, extra)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="image", help="image, text, all or task names")
    p.add_argument("--rows", default="", help=f"a subset of {','.join(ROWS)} (default: all)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--text-samples", type=int, default=0, help="text tasks' (0: --samples)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--bias-steps", type=int, default=100)
    p.add_argument("--sizes", default="0.13,0.16,0.19,0.22,0.25")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this")
    p.add_argument("--store", type=Path, default=Path("bench-out/quantize_accuracy.json"))
    p.add_argument("--checkpoints", type=Path, default=Path("bench-out/quantize-checkpoints"),
                   help="where quantizing rows keep each calibrated layer (resumable)")  # fmt: skip
    p.add_argument("--llm-store", type=Path, default=Path("bench-out/quantize_smollm2.json"))
    p.add_argument("--report", action="store_true", help="print the tables, run nothing")
    p.add_argument("--plot", type=Path, default=None, help="with --report: draw the figure")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*(deprecated|torch.ao.quantization)")
    torch.set_num_threads(args.threads)
    if args.report:
        from _quantize_report import report

        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
