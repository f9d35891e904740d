"""LAPT's peak RSS on SmolLM2-135M-Instruct: the memory fixes of issue #30 one by one.

Each variant runs in a fresh process: load SmolLM2 (fp32), then ``--steps`` LAPT steps at
block 15 (batch 1 × accumulation 2, full fine-tune) on 4 (prompt, response) pairs of the
study's size, and reports the process's peak RSS (``VmHWM``), the wall time of the steps
and the final loss. Variants:

- ``reference``: single-tensor AdamW, glibc's default (dynamic) mmap threshold — the code
  before the fix;
- ``threshold``: the same optimizer, mmap threshold pinned at 128 KB
  (``splice._memory.return_freed_memory``);
- ``fused``: the threshold and fused AdamW — what ``train_lapt`` does now.

    python benchmarks/lapt_memory.py --steps 3
    python benchmarks/lapt_memory.py --variants fused   # one variant (under a minute)
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from _rss import IMPORT

RUN = """
import time, torch
import splice.train.lapt as L
from splice.analysis.asa import generate
from splice.analysis.inputs import chat_ids, load_model
from splice.analysis.prompt_set import BENIGN
variant, steps = {variant!r}, {steps}
if variant == "reference":
    L.return_freed_memory = lambda *a: False
else:
    L.return_freed_memory(L._MMAP_FROM)
model, tok, _ = load_model("smollm2", causal=True)
pairs = []
for text in BENIGN[:4]:
    p = chat_ids(tok, text)
    pairs.append((p, generate(model, p, 32, pad_token_id=tok.eos_token_id)))
start = time.perf_counter()
fused = variant == "fused"
state = L.train_lapt(model, pairs, 15, steps=steps, pad_id=tok.eos_token_id, fused=fused)
print(f"@@ {{peak_rss_mib():.0f}} {{time.perf_counter() - start:.1f}} {{state.history[-1]:.6f}}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default="reference,threshold,fused", help="comma list")
    a = ap.parse_args()
    print("| variant | peak RSS (MiB) | steps wall (s) | last loss |\n|---|---|---|---|")
    for variant in a.variants.split(","):
        code = IMPORT + RUN.format(variant=variant, steps=a.steps)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("@@ ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rss, wall, loss = line.split()[1:]
        print(f"| {variant} | {rss} | {wall} | {loss} |", flush=True)


if __name__ == "__main__":
    main()
