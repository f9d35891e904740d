"""SHA-256 of every data-free merge method's output on fixed fixtures: a refactor check.

Run by hand (about a minute)::

    .venv/bin/python benchmarks/merge_digest.py [--out digests.json] [--compare old.json]

Builds, under a temporary directory, a tiny random Llama base, three fine-tunes (base +
N(0, 0.01²), seeds 1-3) and two PEFT LoRA dirs, then runs ``splice merge`` (the CLI, in a
child process, as a user would) for every data-free method with its defaults: on the full
checkpoints, on the LoRA dirs, and on the LoRA dirs with ``output: adapter`` (``rank: exact``
for linear methods, 4 otherwise); plus LiNeS on top of task arithmetic and a mergekit-dialect
recipe. It prints one SHA-256 per output over the tensors' names, dtypes, shapes and bytes
(metadata such as the version string is left out). ``--compare`` prints which digests differ
from an earlier run; two commits that merge identically print the same table. Everything is
seeded, so a second run on the same machine prints the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPLICE = [str(Path(sys.executable).parent / "splice")]
TWO_MODEL = {"slerp"}  # merges one model with the base
LINEAR = {"linear", "task_arithmetic"}  # rank: exact concatenates factors
PARAMS = {"dare": {"p": 0.5}, "slerp": {"t": 0.3}}


def _tiny_llama(path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _finetune(base: Path, path: Path, seed: int) -> Path:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(str(path))
    return path


def _lora(base: Path, path: Path, seed: int) -> Path:
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(base))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(path))
    return path


def digest(out: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _methods() -> list[str]:
    code = (
        "from splice.merge.base import methods;print(' '.join(sorted(n for n in methods.names())))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()


def _run(recipe: dict, work: Path, name: str) -> str:
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / "out" / name
    r = subprocess.run(
        [*SPLICE, "merge", str(path), str(out), "--force"], capture_output=True, text=True
    )
    if r.returncode != 0:
        return "error: " + (r.stderr.strip().splitlines() or ["?"])[-1][:120]
    return digest(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the digests as JSON here")
    ap.add_argument("--compare", type=Path, help="an earlier --out file to compare with")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="splice-digest-") as tmp:
        work = Path(tmp)
        base = _tiny_llama(work / "base")
        fts = [str(_finetune(base, work / f"ft{i}", i)) for i in (1, 2, 3)]
        loras = [str(_lora(base, work / f"lora{i}", 10 + i)) for i in (1, 2)]
        for method in _methods():
            models = fts[:1] if method in TWO_MODEL else fts
            params = PARAMS.get(method, {})
            recipe = {"method": method, "base": str(base), "models": models, "params": params}
            results[f"{method}/full"] = _run(recipe, work, f"{method}-full")
            lrecipe = {**recipe, "models": loras[: len(models)]}
            results[f"{method}/lora"] = _run(lrecipe, work, f"{method}-lora")
            rank = "exact" if method in LINEAR else 4
            arecipe = {**lrecipe, "output": "adapter", "rank": rank}
            results[f"{method}/adapter"] = _run(arecipe, work, f"{method}-adapter")
        lines = {"method": "task_arithmetic", "base": str(base), "models": fts}
        results["task_arithmetic+lines/full"] = _run(
            {**lines, "lines": {"beta": 0.5}}, work, "ta-lines"
        )
        mk = {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in fts],
            "dtype": "float32",
        }
        results["mergekit:dare_ties/full"] = _run(mk, work, "mk-dare-ties")
    for key, value in results.items():
        print(f"{key:40s} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        old = json.loads(args.compare.read_text())
        diff = [k for k in sorted(set(old) | set(results)) if old.get(k) != results.get(k)]
        print(f"{len(results) - len(diff)} identical, {len(diff)} differ: {', '.join(diff)}")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
