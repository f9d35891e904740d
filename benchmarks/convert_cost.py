"""Cost of ``splice convert recursive`` on SmolLM2-135M: wall time and peak RSS against the
issue #27 targets (≤ 60 s, ≤ 2 GB), and against merely loading and saving the model.

Each measurement runs in a fresh interpreter (after ``import torch, transformers``): the
``load+save`` baseline loads the packaged SmolLM2 (splice cache: fp32 safetensors) and saves
it; the conversions load, convert (K shared layers, init, rank) and save. Run by hand:

    python benchmarks/convert_cost.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

from _rss import IMPORT

_PRE = IMPORT + (
    "import time, torch, transformers\n"
    "from splice.data.causal_lm import load_causal_lm\n"
    "t0 = time.perf_counter()\n"
    "model, tok = load_causal_lm('smollm2')\n"
)
_POST = "\nprint(time.perf_counter() - t0, peak_rss_mib())"
RUNS = {
    "load+save (baseline)": "model.save_pretrained(OUT)\n",
    "recursive K=10 average r=32": (
        "from splice.convert import convert_recursive, save_recursive\n"
        "save_recursive(convert_recursive(model, 10, 'average', 32), OUT, tok)\n"
    ),
    "recursive K=10 average r=128": (
        "from splice.convert import convert_recursive, save_recursive\n"
        "save_recursive(convert_recursive(model, 10, 'average', 128), OUT, tok)\n"
    ),
    "recursive K=15 stepwise full rank": (
        "from splice.convert import convert_recursive, save_recursive\n"
        "save_recursive(convert_recursive(model, 15, 'stepwise', 'full'), OUT, tok)\n"
    ),
}


def main() -> None:
    rows = []
    for name, code in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [sys.executable, "-c", f"OUT = {tmp + '/m'!r}\n" + _PRE + code + _POST],
                check=True,
                capture_output=True,
                text=True,
            )
        seconds, rss = map(float, out.stdout.split()[-2:])
        rows.append((name, seconds, rss))
        print(f"  {name}: {seconds:.1f} s, {rss:.0f} MiB", flush=True)
    base = rows[0]
    print("\n| run | seconds | × load+save | peak RSS (MiB) | × load+save | targets |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, s, rss in rows:
        ok = "" if name == base[0] else ("met" if s <= 60 and rss <= 2048 else "MISSED")
        print(f"| {name} | {s:.1f} | {s / base[1]:.2f} | {rss:.0f} | {rss / base[2]:.2f} | {ok} |")


if __name__ == "__main__":
    main()
