"""Where the calibration's peak memory falls (issue #28): peak RSS per stage of
``splice.compress.quantize`` (advanced W4A8, sequential AdaQuant) on a bench checkpoint.

    python benchmarks/quantize_rss_stages.py [--task sk_digits] [--samples 1000] [--iters 100]
        [--bias-steps 100] [--threads 1] [--top 8]

A thread reads the process's RSS (``VmRSS``) every 5 ms and keeps the highest value per stage;
the stage is the layer being fitted (from the progress lines: ``after [k/L]`` is layer k+1),
the BN step or bias tuning. ``load`` is the process after loading the model and the calibration
batches and running the float model over them (what ``quantize_cost.py --child fp`` holds).
Prints the ``--top`` stages by peak, then the process's ``VmHWM``.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from _quantize import batches, task_model
from _rss import peak_rss_mib

from splice.compress import AdaQuantConfig, QuantizeConfig, quantize
from splice.train.loop import minimise


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sk_digits")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--bias-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, encoder, data = task_model(args.task)
    calib = batches(encoder.prepare(data.train.x), args.samples, 50)
    with torch.no_grad():
        for b in calib:
            model(b)
    stage, peaks, done = ["load"], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            now, at = _rss_mib(), stage[0]
            peaks[at] = max(peaks.get(at, 0.0), now)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.05)
    stage[0] = "float outputs to the spill, first layer"

    def say(msg: str) -> None:
        stage[0] = "after " + msg.split(":")[0]

    cfg = QuantizeConfig(
        bits=4, bias_steps=args.bias_steps, adaquant=AdaQuantConfig(iters=args.iters)
    )
    start = time.perf_counter()
    quantize(model, calib, lambda m, b: m(b), minimise, cfg, progress=say)
    done.set()
    sampler.join()
    print(f"{args.task}, {len(calib)} batches, {time.perf_counter() - start:.0f} s, "
          f"{args.threads} thread(s); peak RSS by stage (MiB):")  # fmt: skip
    for at, mib in sorted(peaks.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {mib:7.1f}  {at}")
    print(f"  {peaks['load']:7.1f}  load (the float model's process)")
    print(f"VmHWM {peak_rss_mib():.1f} MiB")


if __name__ == "__main__":
    main()
