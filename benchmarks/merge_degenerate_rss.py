"""Peak RSS against the memory plan on Llama-shaped checkpoints whose task vectors are all zero.

Issue #21 item 15: TIES went 4× over its plan when task vectors tie at the trim threshold
(τ = 0 exactly, as for fine-tunes equal to the base), and a 70B-class set was OOM-killed.
Run by hand::

    .venv/bin/python benchmarks/merge_degenerate_rss.py                 # hidden 4096, 1 layer
    .venv/bin/python benchmarks/merge_degenerate_rss.py --shape 70b     # 128256×8192, 2 layers

The base and three fine-tunes are bfloat16 safetensors written as *sparse files*: a real
header, then the file extended to its full size without writing the data, so every tensor
reads as zeros and the set costs no disk (only the merged output is written). Each recipe
runs in a fresh child process; the table gives the plan's working set (``--plan``), the
measured one (``VmHWM`` above the resident set just before the merge) and their ratio — the
target is ≤ 1.1 — plus wall time and the process's whole peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # (vocab, hidden, intermediate, kv hidden, layers)
    "7b": (32000, 4096, 11008, 4096, 1),
    "70b": (128256, 8192, 28672, 1024, 2),
}

CHILD = """
import json, shutil, sys, time
from splice.merge import merge, plan_merge

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

recipe, out = json.loads(sys.argv[1]), sys.argv[2]
plan = plan_merge(recipe)["plan"]["peak_ram"]
import torch  # merging imports it; measure the working set above it
rss = status("VmRSS")
t0 = time.perf_counter()
merge(recipe, out, progress=False)
wall = time.perf_counter() - t0
shutil.rmtree(out)
print(json.dumps({"plan": plan, "work": status("VmHWM") - rss, "peak": status("VmHWM"),
                  "wall": wall}))
"""


def tensors(shape: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama-style checkpoint (GQA: ``kv`` is the k/v projections' rows)."""
    v, h, ff, kv, layers = SHAPES[shape]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {f"{p}self_attn.{m}_proj.weight": (h, h) for m in "qo"}
        out |= {f"{p}self_attn.{m}_proj.weight": (kv, h) for m in "kv"}
        out |= {f"{p}mlp.{m}_proj.weight": (ff, h) for m in ("gate", "up")}
        out[f"{p}mlp.down_proj.weight"] = (h, ff)
        out |= {f"{p}{m}.weight": (h,) for m in ("input_layernorm", "post_attention_layernorm")}
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def sparse_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bfloat16 safetensors file whose data is a hole (reads as zeros); returns its size."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def recipes(root: Path) -> dict[str, dict]:
    base, fts = str(root / "base"), [str(root / m) for m in "abc"]
    common = {"base": base, "models": fts}
    return {
        "ties (global)": {"method": "ties", **common},
        "ties (tensor)": {"method": "ties", **common, "params": {"scope": "tensor"}},
        "task_arithmetic": {"method": "task_arithmetic", **common},
        "dare_ties": {"method": "dare", **common, "params": {"p": 0.5, "consensus": "ties"}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument(
        "--methods", help="comma-separated method names: every row of each (default: all)"
    )
    ap.add_argument("--dir", help="scratch folder (default: a temp dir; needs the output's size)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="degenerate-", dir=args.dir))
    try:
        shapes = tensors(args.shape)
        size = 0
        for name in ("base", "a", "b", "c"):
            size = sparse_checkpoint(root / name, shapes)
        print(f"{args.shape}: {len(shapes)} tensors, {size / 2**30:.2f} GiB per checkpoint")
        cols = ("plan GiB", "work GiB", "ratio", "peak GiB", "s")
        print(f"{'recipe':18} " + " ".join(f"{c:>9}" for c in cols))
        wanted = args.methods.split(",") if args.methods else None
        for label, recipe in recipes(root).items():
            if wanted and label.split(" ")[0] not in wanted:
                continue
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(recipe), str(root / "out")],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                print(f"{label:18} failed after {time.perf_counter() - t0:.0f} s: {tail[0]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{label:18} {r['plan'] / 2**30:9.2f} {r['work'] / 2**30:9.2f} "
                f"{r['work'] / r['plan']:9.2f} {r['peak'] / 2**30:9.2f} {r['wall']:9.1f}",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
