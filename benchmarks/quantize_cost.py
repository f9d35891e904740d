"""Calibration cost of ``splice.compress.quantize`` with 1,000 samples (issue #28): wall time
and peak memory, EfficientNet-Lite0 and MiniLM-L6.

    python benchmarks/quantize_cost.py [--tasks sk_digits,rt_sentiment] [--samples 1000]
        [--iters 100] [--bias-steps 100] [--mode sequential] [--store bench-out/quantize_cost.json]

Per task (its bench checkpoint, as in ``benchmarks/quantize_accuracy.py``) two fresh processes:
``fp`` loads the model and the calibration batches and runs the float model over them (what
holding and running the FP model costs); ``quantize`` loads the same and runs the advanced
W4A8 pipeline (AdaQuant per layer in ``--mode``, BN, bias tuning). Peak memory is each
process's own peak RSS (``VmHWM``, ``benchmarks/_rss.py``), so torch, Python and the data
count in both; the ratio quantize / fp is the number the issue's "≤ 2× the FP model" target
is read against, and the peak above the FP process is also given in units of the model's
parameter bytes. A quantize child may run in pieces (``--child quantize --checkpoint DIR
--budget-s S``: it stops after the first layer past S seconds, exit 3, and the same command
goes on from DIR); its ``seconds`` then count every piece, and each piece reports its own
peak. Both processes then score their model on the test split (after the peak
is read), so the row also gives the accuracy at 1,000 samples. Each finished task goes into
``--store`` (JSON) and is skipped next time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _quantize import Store, accuracy, batches, task_model
from _rss import peak_rss_mib


def _child(args: argparse.Namespace) -> None:
    from splice.compress import AdaQuantConfig, QuantizeConfig, quantize
    from splice.train.loop import minimise

    torch.set_num_threads(args.threads)
    model, encoder, data = task_model(args.task)
    calib = batches(encoder.prepare(data.train.x), args.samples, 50)
    samples = sum(len(b["input_ids"]) if isinstance(b, dict) else len(b) for b in calib)
    start = time.perf_counter()
    out: dict = {
        "samples": samples,
        "model_mib": sum(p.numel() for p in model.parameters()) / 2**18,
    }
    if args.child == "fp":
        with torch.no_grad():
            for b in calib:
                model(b)
    else:
        cfg = QuantizeConfig(
            bits=4, mode=args.mode, bias_steps=args.bias_steps,
            adaquant=AdaQuantConfig(iters=args.iters),
        )  # fmt: skip
        last = [time.perf_counter()]

        def say(msg: str) -> None:
            now = time.perf_counter()
            if now - last[0] > 30 or not msg.startswith("["):  # stages always, layers at times
                print(f"  {now - start:.0f} s: {msg}", file=sys.stderr, flush=True)
                last[0] = now
            if args.budget_s and now - start > args.budget_s and msg.startswith("["):
                print(json.dumps({"stopped_after": msg, "seconds_here": now - start,
                                  "peak_rss_mib": peak_rss_mib()}))  # fmt: skip
                sys.exit(3)  # the layers so far are in --checkpoint: run the child again

        model, report = quantize(model, calib, lambda m, b: m(b), minimise, cfg, progress=say,
                                 checkpoint=args.checkpoint)  # fmt: skip
        out |= {"fraction": report.fraction, "loss": report.loss, "seconds": report.seconds,
                "adaquant_s": sum(r.seconds for r in report.layers)}  # fmt: skip
    out |= {"seconds_here": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}
    out.setdefault("seconds", out["seconds_here"])
    test = batches(encoder.prepare(data.test.x), len(data.test.x), 100)
    out["accuracy"] = accuracy(model, test, data.test.y)  # after the peak is read
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="sk_digits,rt_sentiment")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--bias-steps", type=int, default=100)
    p.add_argument("--mode", default="sequential", choices=("sequential", "parallel"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--store", type=Path, default=Path("bench-out/quantize_cost.json"))
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="quantize child: keep each calibrated layer here, resume from it",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="quantize child: stop after a layer past this (exit 3; run it again)",
    )
    p.add_argument("--child", choices=("fp", "quantize"), help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    store = Store(args.store)
    for task in args.tasks.split(","):
        key = f"{task}|n{args.samples}|i{args.iters}|b{args.bias_steps}|{args.mode}|t{args.threads}"
        if key in store:
            print(f"{task}: stored {store.rows[key]}")
            continue
        result = {"task": task, "threads": args.threads, "iters": args.iters, "mode": args.mode}
        for child in ("fp", "quantize"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", child, "--task", task]
            print(f"{task}: {child} process …", flush=True)
            done = subprocess.run(cmd, capture_output=False, stdout=subprocess.PIPE, text=True)
            if done.returncode:
                sys.exit(done.returncode)
            result[child] = json.loads(done.stdout.strip().splitlines()[-1])
        fp, q = result["fp"], result["quantize"]
        result["rss_ratio"] = q["peak_rss_mib"] / fp["peak_rss_mib"]
        result["above_fp_in_models"] = (q["peak_rss_mib"] - fp["peak_rss_mib"]) / q["model_mib"]
        store.put(key, result)
        print(f"{task}: {q['samples']} samples, calibration {q['seconds']:.0f} s "
              f"({args.threads} thread), peak RSS {q['peak_rss_mib']:.0f} MiB vs FP "
              f"{fp['peak_rss_mib']:.0f} MiB ({result['rss_ratio']:.2f}×; model "
              f"{q['model_mib']:.1f} MiB, peak above FP = {result['above_fp_in_models']:.1f}× "
              f"the model); accuracy {fp['accuracy']:.4f} → {q['accuracy']:.4f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
