"""Wall time, peak RSS and output agreement of splice vs mergekit on a 168M-param Llama merge.

Run by hand (heavy: ~3 GB of fixtures, a few minutes)::

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--methods linear,ties] [--repeat 3]

Installs mergekit into ``.bench-venv`` (``torch==2.13.0`` first, then ``mergekit``) if it is
missing; builds a random base and three fine-tunes (hidden 1024, 8 layers, vocab 32000,
intermediate 2816, fp32, 3 shards each; fine-tune = base + N(0, 0.01²)) under
``bench-out/merge_vs_mergekit``; runs the same mergekit YAML through ``mergekit-yaml`` and
``splice merge`` (with and without ``--no-checksums``: mergekit hashes nothing, splice's
ledger hashes every file by default) in fresh child processes (page cache warmed first) and
prints per method the median wall time and peak RSS of ``--repeat`` runs per tool (``wait4``
rusage of the child, forked by a small wrapper so that this process's own RSS is not carried
into it), their ratios, and max |Δ| between the two outputs. The tools take turns, and every
timed run starts right after the previous run's output was deleted: on a VM, memory the guest
freed long ago is slow to touch again (writing 0.67 GB measured 0.4 GB/s into such pages, 3
GB/s into just-freed ones), so each run must find the same conditions. DARE draws different
random masks in each tool, so for dare_ties it compares statistics instead: the fraction of
entries changed from the base and the mean |θ − θ₀|.
For ties and breadcrumbs, entries whose |τ| equals a model's sort cut are reported apart:
there mergekit's unstable sort keeps an arbitrary subset of the tied entries (splice keeps them
all for ties, the lowest indices for breadcrumbs). DELLA's masks are random too (statistics);
arcee_fusion takes its quantiles from a random 1M-entry sample of tensors larger than that,
so those tensors are compared by statistics and the rest exactly. Every other method is
compared entry by entry (max |Δ| and the count of bit-identical tensors).
``--no-bare`` skips the ``--no-checksums`` runs.

splice remembers input digests across runs while a file's stat is unchanged
(``splice.io._hash.DigestCache``); here in ``CACHE``. Each repeat times splice twice with
checksums: *cold*, with that cache deleted first (every input hashed), then *warm* (inputs
found in the cache; outputs still hashed). Both are printed; the cold column is the first-run
figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venv"
WORK = ROOT / "bench-out" / "merge_vs_mergekit"
SPLICE = ROOT / ".venv" / "bin" / "splice"
CACHE = WORK / "sha256-cache.json"
SPLICE_CMD = [str(SPLICE)] if SPLICE.exists() else [sys.executable, "-m", "splice.cli"]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "hidden_act": "silu",
}
RECIPES = {
    "linear": """merge_method: linear
models:
  - {{model: {ft0}, parameters: {{weight: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.3}}}}
  - {{model: {ft2}, parameters: {{weight: 0.2}}}}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 1.0}}}}
  - {{model: {ft1}, parameters: {{weight: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5}}}}
parameters: {{lambda: 0.5}}
dtype: float32
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {ft1}, parameters: {{density: 0.5, weight: 0.3}}}}
  - {{model: {ft2}, parameters: {{density: 0.5, weight: 0.2}}}}
parameters: {{normalize: true}}
dtype: float32
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {ft1}, parameters: {{density: 0.5, weight: 0.3}}}}
  - {{model: {ft2}, parameters: {{density: 0.5, weight: 0.2}}}}
dtype: float32
""",
}


def _recipe(method: str, per_model: str | None = "", params: str = "", base: bool = True) -> str:
    """Three fine-tunes with weights 0.5/0.3/0.2 after ``per_model`` (None: no per-model
    parameters), global ``params``; templates for ``str.format`` (braces doubled)."""
    head = f"merge_method: {method}\n" + ("base_model: {base}\n" if base else "")
    models = "".join(
        f"  - {{{{model: {{ft{i}}}}}}}\n"
        if per_model is None
        else f"  - {{{{model: {{ft{i}}}, parameters: {{{{{per_model}weight: {w}}}}}}}}}\n"
        for i, w in enumerate((0.5, 0.3, 0.2))
    )
    tail = f"parameters: {{{{{params}}}}}\n" if params else ""
    return head + "models:\n" + models + tail + "dtype: float32\n"


# mergekit 0.1.5's other methods (issue #31)
RECIPES.update(
    {
        "breadcrumbs": _recipe("breadcrumbs", "density: 0.5, gamma: 0.01, "),
        "breadcrumbs_ties": _recipe("breadcrumbs_ties", "density: 0.5, gamma: 0.01, "),
        "della": _recipe("della", "density: 0.5, epsilon: 0.1, "),
        "della_linear": _recipe("della_linear", "density: 0.5, epsilon: 0.1, "),
        "sce": _recipe("sce", None, "select_topk: 0.5"),
        "model_stock": _recipe("model_stock", None),
        "multislerp": _recipe("multislerp"),
        "karcher": _recipe("karcher", None, base=False),
        "ram": _recipe("ram", None, "epsilon: 0.01"),
        "ramplus_tl": _recipe("ramplus_tl", None, "epsilon: 0.01"),
        "nuslerp": """merge_method: nuslerp
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.4}}}}
  - {{model: {ft1}, parameters: {{weight: 0.6}}}}
dtype: float32
""",
        "nearswap": """merge_method: nearswap
base_model: {base}
models:
  - {{model: {ft0}}}
parameters: {{t: 0.005}}
dtype: float32
""",
        "arcee_fusion": """merge_method: arcee_fusion
base_model: {base}
models:
  - {{model: {ft0}}}
dtype: float32
""",
    }
)
RANDOM = ("dare", "della")
"""Methods whose masks are random: each tool draws its own, so statistics are compared."""
CUTS = {"ties": [(0.5, 0.0)], "breadcrumbs": [(0.5, 0.01)]}
"""Sort-based masks: (density, gamma) whose cut values an unstable sort may split."""


def ensure_mergekit() -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit into {VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # The same torch build as splice's (PyPI's torch wheel for Linux is a CUDA build of several
    # GB): this interpreter's site-packages go on the bench venv's path *after* its own, so
    # mergekit and its pins install into the bench venv and torch comes from here.
    bench_python = VENV / "bin" / "python"
    site = subprocess.run(
        [str(bench_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and "torch" in os.listdir(p)]
    Path(site, "zz-splice-torch.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([str(bench_python), "-m", "pip", "install", "-q", "mergekit==0.1.5"], check=True)
    return exe


def build_fixtures() -> dict[str, Path]:
    from splice.io import CheckpointWriter

    paths = {name: WORK / name for name in ("base", "ft0", "ft1", "ft2")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    print("building 4 × 168M-param fp32 checkpoints ...", flush=True)
    h, inter, layers, vocab = 1024, 2816, 8, 32000
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{m}_proj.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    aux = WORK / "aux"
    aux.mkdir(parents=True, exist_ok=True)
    (aux / "config.json").write_text(json.dumps(CONFIG, indent=2))
    for idx, (name, path) in enumerate(paths.items()):
        g = torch.Generator().manual_seed(idx)
        # 250 MB shards: embeddings + 2 layers | 4 layers | 2 layers + head = 3 shards
        with CheckpointWriter(
            path, max_shard_size=250_000_000, force=True, copy_files_from=aux
        ) as w:
            for tname, shape in shapes.items():
                gb = torch.Generator().manual_seed(zlib.crc32(tname.encode()))
                base = (
                    torch.ones(shape)
                    if tname.endswith("norm.weight")
                    else torch.randn(shape, generator=gb) * 0.02
                )
                if name != "base":
                    base += torch.randn(shape, generator=g) * 0.01
                w.write(tname, base)
    print(f"  {sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M params each", flush=True)
    return paths


def warm(paths: dict[str, Path]) -> None:
    for p in paths.values():
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# Linux carries a process's peak RSS across fork + exec, so a child forked from this process
# (torch loaded, fixtures compared) would report at least this process's RSS. A small wrapper
# process forks the tool instead and reports the tool's own wall time and peak RSS.
WRAPPER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
print(f"@@ {os.waitstatus_to_exitcode(status)} {wall} {usage.ru_maxrss}", flush=True)
"""


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process (see WRAPPER)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SPLICE_DIGEST_CACHE": str(CACHE),
    }
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("@@ ")][-1]
    code, wall, rss_kb = line.split()[1:]
    if int(code) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}")
    return float(wall), int(rss_kb) / 1024**2


def _with_out(cmd: list[str], out: Path) -> list[str]:
    """``cmd`` with the output dir after the recipe (both tools take RECIPE OUT)."""
    i = next(i for i, a in enumerate(cmd) if a.endswith(".yml"))
    return [*cmd[: i + 1], str(out), *cmd[i + 1 :]]


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall time and median peak RSS over repeated runs."""
    walls, rss = sorted(w for w, _ in runs), sorted(r for _, r in runs)
    return walls[len(walls) // 2], rss[len(rss) // 2]


def _at_cut(paths: dict[str, Path], name: str, pos: torch.Tensor, method: str) -> bool:
    """Whether every entry at ``pos`` ties with a sort cut of some model's |τ| (see CUTS)."""
    from splice.io import open_checkpoint

    base = open_checkpoint(paths["base"])[name].reshape(-1)
    tied = torch.zeros(pos.numel(), dtype=torch.bool)
    for m in ("ft0", "ft1", "ft2"):
        tau = (open_checkpoint(paths[m])[name].reshape(-1) - base).abs()
        n = tau.numel()
        for density, gamma in CUTS[method]:
            keep = int(density * n)
            start = max(0, n - keep - int(gamma * n))
            for rank in {start + 1, start + keep}:  # first and last kept, ascending
                tied |= tau[pos] == torch.kthvalue(tau, rank).values
    return bool(tied.all())


def _statistics(a, b, base) -> str:
    """Fraction of entries changed from the base and mean |θ − θ₀|, per tool."""
    changed, mag, count = [0.0, 0.0], [0.0, 0.0], 0
    for n in a:
        b0 = base[n]
        for i, c in enumerate((a, b)):
            d = c[n] - b0
            changed[i] += float((d != 0).sum())
            mag[i] += float(d.abs().sum())
        count += b0.numel()
    return (
        f"changed {changed[0] / count:.3f} vs {changed[1] / count:.3f}; "
        f"mean|Δθ| {mag[0] / count:.2e} vs {mag[1] / count:.2e}"
    )


def compare(a: Path, b: Path, paths: dict[str, Path], method: str) -> str:
    from splice.io import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca) != set(cb):
        return f"tensor sets differ: {sorted(set(ca) ^ set(cb))[:3]}"
    if method.startswith(RANDOM):
        return _statistics(ca, cb, open_checkpoint(paths["base"]))
    family = method.removesuffix("_ties") if method != "ties" else method
    worst, ties, tie_max, exact, sampled = 0.0, 0, 0.0, 0, []
    for n in ca:
        if method == "arcee_fusion" and ca[n].numel() > 1_000_000:
            sampled.append(n)  # quantiles from a random sample: compared by statistics below
            continue
        diff = (ca[n].double() - cb[n].double()).abs().reshape(-1)
        exact += int(not diff.any())
        pos = torch.nonzero(diff > 1e-6).reshape(-1)
        if family in CUTS and pos.numel() and _at_cut(paths, n, pos, family):
            ties += pos.numel()
            tie_max = max(tie_max, float(diff[pos].max()))
            diff[pos] = 0
        worst = max(worst, float(diff.max()))
    note = f" (+{ties} entries at sort ties, up to {tie_max:.1e})" if ties else ""
    out = f"{worst:.1e}{note}, {exact}/{len(ca) - len(sampled)} tensors bit-identical"
    if sampled:
        base = open_checkpoint(paths["base"])
        pick = {n: ca[n] for n in sampled}
        out += f"; {len(sampled)} sampled-quantile tensors: " + _statistics(
            pick, {n: cb[n] for n in sampled}, base
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median)")
    ap.add_argument("--no-bare", action="store_true", help="skip the --no-checksums runs")
    args = ap.parse_args()
    mergekit = ensure_mergekit()
    paths = build_fixtures()
    rows = []
    for method in args.methods.split(","):
        recipe = WORK / f"{method}.yml"
        recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in paths.items()}))
        outs = {tool: WORK / f"out-{method}-{tool}" for tool in ("mergekit", "splice")}
        splice_cmd = [*SPLICE_CMD, "merge", str(recipe), "--seed", "0"]
        cmds = {
            "mergekit": [str(mergekit), str(recipe), "--random-seed", "0", "--no-copy-tokenizer",
                         "--no-write-model-card", "--quiet"],
            "cold": splice_cmd,  # the digest cache deleted first
            "splice": splice_cmd,  # warm: the cold run just filled it
            "bare": [*splice_cmd, "--no-checksums"],
        }  # fmt: skip
        if args.no_bare:
            del cmds["bare"]
        # The outputs to compare (untimed), then removed: each timed run below starts just
        # after the previous run's output was deleted, so every run finds the same free memory.
        for tool, out in outs.items():
            shutil.rmtree(out, ignore_errors=True)
            run_child(_with_out(cmds[tool], out))
        delta = compare(outs["mergekit"], outs["splice"], paths, method)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in cmds}
        scratch = WORK / f"out-{method}-timed"
        for _ in range(args.repeat):
            for tool, cmd in cmds.items():
                if tool == "cold":
                    CACHE.unlink(missing_ok=True)
                warm(paths)
                runs[tool].append(run_child(_with_out(cmd, scratch)))
                shutil.rmtree(scratch, ignore_errors=True)
        mk, sp, cold = (_median(runs[t]) for t in ("mergekit", "splice", "cold"))
        bare = _median(runs["bare"]) if "bare" in runs else (math.nan, math.nan)
        rows.append((method, mk, cold, sp, bare, delta))
        print(
            f"{method:16s} mergekit {mk[0]:6.1f} s {mk[1]:5.2f} GB | splice cold "
            f"{cold[0]:6.1f} s {cold[1]:5.2f} GB, warm {sp[0]:6.1f} s {sp[1]:5.2f} GB | "
            f"no checksums {bare[0]:6.1f} s | {delta}",
            flush=True,
        )
        print(
            "  all runs (s): "
            + "; ".join(f"{t} " + " ".join(f"{w:.1f}" for w, _ in r) for t, r in runs.items()),
            flush=True,
        )
    print()
    print("| method | mergekit time | splice cold (ratio) | splice warm (ratio) "
          "| splice --no-checksums (ratio) | mergekit peak RSS | splice peak RSS, cold (ratio) "
          "| max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for method, (mt, mr), (ct, cr), (st, _), (bt, _), delta in rows:
        print(
            f"| {method} | {mt:.1f} s | {ct:.1f} s ({ct / mt:.2f}×) | {st:.1f} s ({st / mt:.2f}×) "
            f"| {bt:.1f} s ({bt / mt:.2f}×) | {mr:.2f} GB | {cr:.2f} GB ({cr / mr:.2f}×) "
            f"| {delta} |"
        )


if __name__ == "__main__":
    main()
