"""Wall time and peak RSS of PCB, LiNeS, DC-Merge, DO-Merging and T-Switch merges.

Run by hand: ``.venv/bin/python benchmarks/merge_methods_rss.py [--hidden 512 --layers 8]``.
Builds a random Llama-shaped fp32 base and three fine-tunes (sharded) in a temp dir, then runs
each method through ``splice.merge`` in a fresh child process and prints wall time and the
child's peak RSS. For PCB it also runs the authors' formulation in RAM (flatten the whole
model, sort each task row for the quantiles — ``pcb_ES.py``) and reports the largest
difference between the two outputs, so the streaming statistics are checked at scale.

``--scaling``: instead, builds the model twice — ``--layers`` and 10× as many, same tensor
shapes, so the largest tensor is the same and only the tensor count grows — and prints each
method's peak RSS on both and the ratio (issue #4's target: < 1.10, memory must not grow with
the number of tensors).

``--devices cpu,cuda``: instead, times task arithmetic, TIES, DARE-TIES, DC-Merge and PCB with
``device=`` each of the listed devices (each run a fresh child; the GPU's figure includes moving
every tensor there and back) and prints each device's wall time relative to the first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _rss import IMPORT

RUN = (
    IMPORT
    + """
import time, json, sys
from splice.merge import merge
t0 = time.perf_counter()
merge(json.loads(sys.argv[1]), sys.argv[2], device=sys.argv[3] if len(sys.argv) > 3 else "cpu")
print(time.perf_counter() - t0, peak_rss_mib())
"""
)

DENSE_PCB = (
    IMPORT
    + """
import time, sys, torch
from splice.io import open_checkpoint, CheckpointWriter
root, ratio, clip = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
t0 = time.perf_counter()
base = open_checkpoint(root + "/base")
names = [n for n in base if base.info(n).dtype.is_floating_point]
fts = [open_checkpoint(f"{root}/ft{i}") for i in range(3)]
flat = torch.stack([torch.cat([(f[n] - base[n]).flatten() for n in names]) for f in fts])
n, d = flat.shape
def clamp(x, lo, hi):
    s = torch.sort(x, dim=1).values
    return torch.clamp(x, s[:, int(d * lo)].unsqueeze(1), s[:, int(d * (1 - hi) - 1)].unsqueeze(1))
def norm(x):
    mn, mx = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    return (x - mn) / (mx - mn)
mag = clamp(flat.abs(), clip, clip)
sgn = torch.sign(flat)
del flat
clipped, normed = sgn * mag, sgn * norm(mag)
intra = torch.exp(n * norm(mag) ** 2)
del mag, sgn
inter = torch.stack([torch.tanh(normed[i] * normed).sum(0) for i in range(n)])
scale = norm(clamp(intra * inter, 1 - ratio, 0))
merged = (clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
with CheckpointWriter(root + "/dense_pcb") as w:
    start = 0
    for name in base:
        b = base[name]
        if name in names:
            w.write(name, b + merged[start : start + b.numel()].reshape(b.shape))
            start += b.numel()
        else:
            w.write(name, b)
print(time.perf_counter() - t0, peak_rss_mib())
"""
)


def build(root: Path, hidden: int, layers: int, vocab: int) -> int:
    from splice.io import CheckpointWriter

    g = torch.Generator().manual_seed(0)
    inter = hidden * 8 // 3
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{m}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}
    cfg = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden}
    aux = root / "aux"
    aux.mkdir()
    (aux / "config.json").write_text(json.dumps(cfg))
    for name in ["base", "ft0", "ft1", "ft2"]:
        with CheckpointWriter(root / name, max_shard_size="64MB", copy_files_from=aux) as w:
            for n, t in base.items():
                w.write(n, t if name == "base" else t + 0.002 * torch.randn(t.shape, generator=g))
    return sum(t.numel() for t in base.values())


def child(code: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    wall, rss = out.stdout.split()[-2:]
    return float(wall), float(rss)


def _recipe(root: Path, method: str, params: dict) -> str:
    models = [str(root / f"ft{i}") for i in range(3)]
    return json.dumps({"method": method, "base": str(root / "base"), "models": models, **params})


def scaling(hidden: int, layers: int, vocab: int) -> None:
    """Peak RSS of the same merges on ``layers`` and ``10 * layers`` layers."""
    recipes = {
        "task_arithmetic": {},
        "ties (global top-k)": {"params": {"density": 0.2, "scope": "global"}},
        "ties (per tensor)": {"params": {"density": 0.2, "scope": "tensor"}},
        "dare (ties)": {"params": {"consensus": "ties", "p": 0.5}},
    }
    rss: dict[str, list[float]] = {k: [] for k in recipes}
    sizes = []
    for n_layers in (layers, 10 * layers):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            params = build(root, hidden, n_layers, vocab)
            sizes.append((n_layers, params))
            for label, extra in recipes.items():
                method = label.split()[0]
                _, peak = child(RUN, _recipe(root, method, extra), str(root / "out"))
                rss[label].append(peak)
                shutil.rmtree(root / "out")
    (l1, p1), (l2, p2) = sizes
    print(f"{l1} vs {l2} layers: {p1 / 1e6:.1f}M vs {p2 / 1e6:.1f}M params per model, x4 models")
    print(f"| method | peak RSS MiB, {l1} layers | {l2} layers | ratio |\n|---|---|---|---|")
    for label, (a, b) in rss.items():
        print(f"| {label} | {a:.0f} | {b:.0f} | {b / a:.3f} |")


def devices(hidden: int, layers: int, vocab: int, names: list[str]) -> None:
    """Wall time of the same merges with ``device=`` each of ``names``."""
    recipes = {
        "task_arithmetic": {},
        "ties": {"params": {"density": 0.2}},
        "dare (ties)": {"params": {"consensus": "ties", "p": 0.5}},
        "dc_merge": {},
        "pcb": {"params": {"ratio": 0.05}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = build(root, hidden, layers, vocab)
        print(f"3 fine-tunes of a {params / 1e6:.1f}M-param fp32 model, devices {names}")
        print(f"| method | {' | '.join(f'{d} s' for d in names)} | vs {names[0]} |")
        print("|---|" + "---|" * (len(names) + 1))
        for label, extra in recipes.items():
            walls = []
            for device in names:
                recipe = _recipe(root, label.split()[0], extra)
                walls.append(child(RUN, recipe, str(root / "out"), device)[0])
                shutil.rmtree(root / "out")
            ratios = " / ".join(f"{w / walls[0]:.2f}×" for w in walls[1:])
            print(f"| {label} | {' | '.join(f'{w:.1f}' for w in walls)} | {ratios} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--scaling", action="store_true", help="peak RSS vs 10x more tensors")
    ap.add_argument("--devices", help="comma-separated, e.g. cpu,cuda: wall time on each")
    args = ap.parse_args()
    if args.devices:
        devices(args.hidden, args.layers, args.vocab, args.devices.split(","))
        return
    if args.scaling:
        scaling(args.hidden, args.layers, args.vocab)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = build(root, args.hidden, args.layers, args.vocab)
        mib = params * 4 / 2**20
        print(f"3 fine-tunes of a {params / 1e6:.1f}M-param fp32 model ({mib:.0f} MiB each)")
        recipes = {
            "pcb": ("pcb", {"ratio": 0.05}, None),
            "task_arithmetic + lines": ("task_arithmetic", {}, {"beta": 0.5}),
            "dc_merge": ("dc_merge", {}, None),
            "do_merge (rank 16)": ("do_merge", {"rank": 16, "steps": 100}, None),
            "tswitch": ("tswitch", {"density": 0.1, "lambda": 0.3}, None),
        }
        print("| method | wall s | peak RSS MiB |\n|---|---|---|")
        for label, (method, p, lines) in recipes.items():
            recipe = {
                "method": method,
                "base": str(root / "base"),
                "models": [str(root / f"ft{i}") for i in range(3)],
                "params": p,
            }
            if lines is not None:
                recipe["lines"] = lines
            out = root / f"out-{method}"
            wall, rss = child(RUN, json.dumps(recipe), str(out))
            print(f"| {label} | {wall:.1f} | {rss:.0f} |")
        wall, rss = child(DENSE_PCB, str(root), "0.05", "0.01")
        print(f"| pcb, authors' in-RAM formulation | {wall:.1f} | {rss:.0f} |")
        from splice.io import open_checkpoint

        a, b = open_checkpoint(root / "out-pcb"), open_checkpoint(root / "dense_pcb")
        diff = max(float((a[n].double() - b[n].double()).abs().max()) for n in a)
        print(f"max |streaming pcb − in-RAM pcb| = {diff:.3g}")


if __name__ == "__main__":
    main()
