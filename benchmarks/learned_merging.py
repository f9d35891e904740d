"""Learned merges on the offline benchmark: accuracy, seconds and peak memory per method.

    .venv/bin/python benchmarks/learned_merging.py [--profile quick] [--methods adamerging,lot]
        [--steps 100] [--threads 1] [--out bench-out/learned]

Each method runs ``splice bench`` (its ``run_bench``) alone in a child process, so the child's
peak RSS is that method's run; the task-arithmetic child (backbone, data, evaluation, and a
merge that needs nothing more) is the baseline of the last column. Fine-tunes come from the
bench cache, so only the first child trains. Learned methods use their short schedule.
Writes ``learned.md`` and ``learned.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _rss import peak_rss_mib

DEFAULT = (
    "task_arithmetic,ties,adamerging,adamerging:task,adamerging:ties,atlas,concrete,"
    "concrete:adamerging,lot,opcm,continual_task_arithmetic"
)
VARIANTS = {  # name:variant -> (method, params)
    "adamerging:task": ("adamerging", {"mode": "task"}),
    "adamerging:ties": ("adamerging", {"ties_density": 0.2}),
    "concrete:adamerging": ("concrete", {"inner": "adamerging"}),
}


def child(spec: str, profile: str, steps: int | None, threads: int, out: Path) -> None:
    import torch

    from splice.bench.merging import MergeSpec
    from splice.bench.runner import _specs, configure, run_bench

    torch.set_num_threads(threads)
    method, params = VARIANTS.get(spec, (spec, {}))
    cfg = configure(profile, methods=[method] if spec != "references" else [])
    cfg = cfg.model_copy(update={"learned_steps": steps})
    if params:  # a variant: the learned spec with its parameters on top of the capped steps
        import splice.bench.runner as runner

        base = _specs(cfg)
        runner._specs = lambda c: [
            MergeSpec(s.method, {**s.params, **params}, learned=True) for s in base
        ]
    start = time.perf_counter()
    results = run_bench(cfg)
    results["child"] = {
        "spec": spec,
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(peak_rss_mib(), 1),
    }
    out.write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=100, help="cap on learned optimisation steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench-out/learned"))
    ap.add_argument("--reuse", action="store_true", help="reuse children's JSON in --out")
    ap.add_argument("--child", default=None)
    ap.add_argument("--child-out", type=Path, default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.profile, a.steps, a.threads, a.child_out)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    specs = ["references", *a.methods.split(",")]
    results = {}
    for spec in specs:
        path = a.out / f"{spec.replace(':', '-')}.json"
        cmd = [sys.executable, __file__, "--child", spec, "--child-out", str(path)]
        cmd += ["--profile", a.profile, "--steps", str(a.steps), "--threads", str(a.threads)]
        if not (a.reuse and path.is_file()):
            print(f"running {spec} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        results[spec] = json.loads(path.read_text())
    table = summarize(results)
    (a.out / "learned.json").write_text(json.dumps({"rows": table, "args": vars(a)}, default=str))
    md = to_markdown(table)
    records = continual_records(results)
    if records:
        from splice.bench.continual import to_markdown as continual_md
        from splice.bench.continual import write_continual

        write_continual(records, a.out)
        md += "\n" + continual_md(records)
    (a.out / "learned.md").write_text(md)
    print(md)


def continual_records(results: dict) -> list[dict]:
    """The continual view of every child, the individual reference once per (seed, order)."""
    out, seen = [], set()
    for res in results.values():
        for r in res.get("continual") or []:
            key = (r["method"], r["seed"], tuple(r["order"]))
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def summarize(results: dict) -> list[dict]:
    from splice.bench.report import summarize as bench_summary

    ref = results["references"]  # trained the experts (if not cached): its peak is higher
    base_rss = results.get("task_arithmetic", ref)["child"]["peak_rss_mb"]
    rows = []
    for r in bench_summary(ref):
        rows.append({"spec": r["key"], "label": r["label"], "avg_acc": r["avg_acc"][0],
                     "avg_norm": r["avg_norm"][0], "seconds": None, "peak_rss_mb": base_rss,
                     "extra_rss_mb": 0.0})  # fmt: skip
    for spec, res in results.items():
        if spec == "references":
            continue
        for r in bench_summary(res):
            if r["kind"] != "merge":
                continue
            rss = res["child"]["peak_rss_mb"]
            rows.append({"spec": spec, "label": r["label"], "avg_acc": r["avg_acc"][0],
                         "avg_norm": r["avg_norm"][0],
                         "seconds": r["merge_s"][0] if r["merge_s"] else None,
                         "peak_rss_mb": rss, "extra_rss_mb": round(rss - base_rss, 1)})  # fmt: skip
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| method | avg acc % | avg normalized % | merge s | peak RSS MB | vs TA run MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        secs = "–" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['label']} | {100 * r['avg_acc']:.1f} | {100 * r['avg_norm']:.1f} | {secs} "
            f"| {r['peak_rss_mb']:.0f} | {r['extra_rss_mb']:+.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
