"""Wall time, peak RSS and agreement of ``splice extract-lora`` vs ``mergekit-extract-lora``.

Run by hand (heavy: the 168M-param fixtures of merge_vs_mergekit.py, ~1.3 GB read per run)::

    .venv/bin/python benchmarks/extract_lora_vs_mergekit.py [--rank 32] [--repeat 3]
        [--venv .bench-venv]

Extracts ``ft0 − base`` of merge_vs_mergekit.py's fixtures (built there if missing, in
``bench-out/merge_vs_mergekit``) with both tools at the same maximum rank, each in its own
child process (wall time and the child's own peak RSS), and compares the outputs module by
module: the max abs difference of the two ``B·A`` products, and both tools' relative error
``‖ΔW − B·A‖_F / ‖ΔW‖_F`` (computed here in float64). mergekit comes from ``--venv`` (default
``.bench-venv``, installed as merge_vs_mergekit.py does when missing).

``--kernel`` times only the per-matrix factorization on one thread, on the fixture's three
weight shapes: mergekit's ``torch.linalg.svd`` (what ``mergekit-extract-lora`` calls per
tensor) against :func:`splice.merge.extract.lowrank_factors`, and checks they agree (light:
no fixtures, no mergekit install).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_mergekit import (
    ROOT,
    SPLICE,
    VENV,
    WORK,
    _median,
    build_fixtures,
    ensure_mergekit,
    run_child,
    warm,
)


def _factors(out: Path) -> dict[str, torch.Tensor]:
    """``module -> B·A`` (float64) of a PEFT LoRA dir, scaled by alpha / r per module."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(str(out / "adapter_model.safetensors"))
    prods = {}
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        r = a.shape[0]
        pat = {k: v for k, v in cfg.get("alpha_pattern", {}).items() if module.endswith(k)}
        alpha = next(iter(pat.values()), cfg["lora_alpha"])
        prods[module] = (b.double() @ a.double()) * (alpha / r)
    return prods


def compare(mk: Path, sp: Path, paths: dict[str, Path]) -> tuple[float, float, float, int]:
    """(max |ΔW_mk − ΔW_splice|, max rel error mergekit, max rel error splice, modules)."""
    from splice.io import open_checkpoint

    a, b = _factors(mk), _factors(sp)
    ft, base = open_checkpoint(paths["ft0"]), open_checkpoint(paths["base"])
    diff = err_mk = err_sp = 0.0
    for module in sorted(set(a) | set(b)):
        if module not in a or module not in b:
            raise SystemExit(f"{module} is in only one output")
        name = f"{module}.weight"
        d = ft[name].double() - base[name].double()
        diff = max(diff, float((a[module] - b[module]).abs().max()))
        err_mk = max(err_mk, float((d - a[module]).norm() / d.norm()))
        err_sp = max(err_sp, float((d - b[module]).norm() / d.norm()))
    return diff, err_mk, err_sp, len(a)


def kernel(rank: int) -> None:
    """Per-matrix factorization time, one thread: full SVD vs splice's Gram + eigh."""
    import time

    from splice.merge.extract import lowrank_factors

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| shape | torch.linalg.svd | splice lowrank_factors (ratio) | max abs diff of B·A |")
    print("|---|---|---|---|")
    for shape in [(1024, 1024), (2816, 1024), (1024, 2816)]:
        x = torch.randn(*shape, generator=g) * 0.01
        ts, tg = [], []
        for _ in range(3):
            t = time.perf_counter()
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            ts.append(time.perf_counter() - t)
            t = time.perf_counter()
            b, a, _ = lowrank_factors(x, rank)
            tg.append(time.perf_counter() - t)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        diff = float((b @ a - best).abs().max())
        print(f"| {shape} | {min(ts):.3f} s | {min(tg):.3f} s ({min(tg) / min(ts):.2f}×) "
              f"| {diff:.1e} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--kernel", action="store_true", help="time the factorization only")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--venv", type=Path, default=VENV, help="venv with mergekit 0.1.5")
    args = ap.parse_args()
    if args.kernel:
        kernel(args.rank)
        return
    exe = args.venv / "bin" / "mergekit-extract-lora"
    if not exe.exists():
        ensure_mergekit()
        exe = VENV / "bin" / "mergekit-extract-lora"
    paths = build_fixtures()
    warm({k: paths[k] for k in ("base", "ft0")})
    outs = {tool: WORK / f"extract-{tool}" for tool in ("mergekit", "splice")}
    rank = str(args.rank)
    cmds = {
        "mergekit": [
            str(exe), "--model", str(paths["ft0"]), "--base-model", str(paths["base"]),
            "--out-path", str(outs["mergekit"]), "--max-rank", rank,
        ],
        "splice": [
            *([str(SPLICE)] if SPLICE.exists() else [sys.executable, "-m", "splice.cli"]),
            "extract-lora", str(paths["ft0"]), str(paths["base"]),
            str(outs["splice"]), "--max-rank", rank, "--force",
        ],
    }  # fmt: skip
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in cmds}
    for i in range(args.repeat):
        for tool, cmd in cmds.items():
            if tool == "mergekit" and outs["mergekit"].exists():
                import shutil

                shutil.rmtree(outs["mergekit"])
            runs[tool].append(run_child(cmd))
            print(f"run {i + 1} {tool}: {runs[tool][-1][0]:.1f} s {runs[tool][-1][1]:.2f} GB")
    mk, sp = _median(runs["mergekit"]), _median(runs["splice"])
    diff, err_mk, err_sp, n = compare(outs["mergekit"], outs["splice"], paths)
    print(f"\nLoRA extraction, 168M Llama fixture, rank {rank}, {n} modules, median of "
          f"{args.repeat} (cwd {ROOT})")  # fmt: skip
    print("| tool | time | peak RSS | max rel. error |")
    print("|---|---|---|---|")
    print(f"| mergekit-extract-lora 0.1.5 | {mk[0]:.1f} s | {mk[1]:.2f} GB | {err_mk:.4f} |")
    print(
        f"| splice extract-lora | {sp[0]:.1f} s ({sp[0] / mk[0]:.2f}×) | {sp[1]:.2f} GB "
        f"({sp[1] / mk[1]:.2f}×) | {err_sp:.4f} |"
    )
    print(f"max |ΔW_mergekit − ΔW_splice| over all modules: {diff:.2e}")


if __name__ == "__main__":
    main()
