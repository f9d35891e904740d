"""Why full fine-tuning lands below LoRA in the PEFT track's quick profile (issue #22's target
"full fine-tune ≥ LoRA ≥ linear probe"): the same protocol with a wider full-FT lr grid and
more steps, every choice made on the validation split.

    flock /tmp/splice-heavy.lock python benchmarks/peft_full_vs_lora.py
        [--tasks rt_sentiment] [--steps 40,120] [--full-grid 5e-5,1e-4,2e-4,5e-4]

Runs :func:`splice.bench.peft.run_peft` on the quick profile as it was when docs/bench.md's
table was measured (batch 16, 32 tokens, caps 1000/150/400; pinned here, the quick profile is
smaller now), seed 0, head lr from the probe, LoRA's lr from 1e-3/5e-3, with the rows
``lora`` and the two references, once per step count, full fine-tuning over ``--full-grid``
instead of the quick profile's single 5e-5. Prints, per step count, each row's validation
accuracy at every lr it tried, its pick and the pick's test accuracy (touched once). Rows are
cached like the track's, so a re-run prints the same numbers at no cost.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="rt_sentiment")
    ap.add_argument("--steps", default="40,120")
    ap.add_argument("--full-grid", default="5e-5,1e-4,2e-4,5e-4")
    args = ap.parse_args()
    from splice.bench.peft import PEFT_PROFILES, run_peft

    grid = tuple(float(x) for x in args.full_grid.split(","))
    print("| steps | row | val acc by lr | picked lr | test acc | s/step |")
    print("|---:|---|---|---:|---:|---:|")
    for steps in (int(s) for s in args.steps.split(",")):
        start = time.perf_counter()
        tasks = tuple(args.tasks.split(","))
        update = {"tasks": tasks, "methods": ("lora",), "steps": steps, "full_lr_grid": grid}
        update |= {"batch_size": 16, "caps": (1000, 150, 400), "max_len": 32}
        cfg = PEFT_PROFILES["quick"].model_copy(update=update)
        results = run_peft(cfg)
        for r in results["rows"]:
            if r["status"] != "ok":
                why = r.get("error") or r.get("reason")
                print(f"| {steps} | {r['key']} | {r['status']}: {why}")
                continue
            val = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in r["val"].items())
            print(
                f"| {steps} | {r['task']}/{r['key']} | {val} | {r['lr']:g} | "
                f"{100 * r['acc'][0]:.1f} | {r['s_per_step']:.3f} |",
                flush=True,
            )
        print(f"<!-- {steps} steps: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
