"""Cross-scale parametric knowledge transfer on SmolLM2 (issue #27 item 3, spec other.md §5):
held-out perplexity of the student before, after PostPKT, after LaTen, and the teacher.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: a smaller model of the same family and
tokenizer — e.g. the 10-layer depth-pruned SmolLM2 (``splice convert prune smollm2 --keep
10``, uptrained by ``benchmarks/recursive_smollm2.py``). Each method is one run of the driver
:func:`splice.train.transfer.transfer` (``splice convert transfer``) on WordNet noun glosses:
``--extract`` documents locate, ``--align`` train (``--steps`` steps of batch 1), ``--heldout``
others measure.

    python benchmarks/transfer_smollm2.py --student /tmp/rrt/up/pruned/model --out /tmp/pkt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="one subdir per method")
    parser.add_argument("--methods", default="postpkt,laten")
    parser.add_argument("--extract", type=int, default=8)
    parser.add_argument("--align", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args()
    from splice.train.transfer import TransferConfig, transfer

    rows: dict[str, float] = {}
    for i, method in enumerate(args.methods.split(",")):
        cfg = TransferConfig(
            teacher=args.teacher, student=str(args.student), out=args.out / method,
            method=method, extract=args.extract, align=args.align, heldout=args.heldout,
            steps=args.steps, max_length=args.max_length, force=True,
            teacher_perplexity=i == 0,
        )  # fmt: skip
        start = time.perf_counter()
        metrics = transfer(cfg, log=lambda s: print(f"  {s}", flush=True))
        rows.setdefault("student", metrics["before_perplexity"])
        if "teacher_perplexity" in metrics:
            rows["teacher"] = metrics["teacher_perplexity"]
        rows[f"student + {method}"] = metrics["after_perplexity"]
        print(f"{method}: {metrics['before_perplexity']:.2f} → {metrics['after_perplexity']:.2f}"
              f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    teacher = rows.pop("teacher")
    print("\n| model | held-out gloss perplexity | ÷ teacher |\n| --- | ---: | ---: |")
    for name, ppl in [*rows.items(), ("teacher", teacher)]:
        print(f"| {name} | {ppl:.2f} | {ppl / teacher:.2f} |")


if __name__ == "__main__":
    main()
