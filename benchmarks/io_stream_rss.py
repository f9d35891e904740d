"""Peak RSS while reading a >1 GB sharded checkpoint tensor by tensor (splice vs safetensors).

Run by hand: ``.venv/bin/python benchmarks/io_stream_rss.py [--gb 1.2]``. Builds a random
fp32 checkpoint with splice's writer in a temp dir, then, in fresh child processes, reads every
tensor once (checksum) with ``splice.io.open_checkpoint`` and with ``safetensors.safe_open``,
and prints each child's peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _rss import IMPORT

READERS = {
    "splice": (
        "from splice.io import open_checkpoint\n"
        "c = open_checkpoint(P)\n"
        "s = 0.0\n"
        "for n in c:\n"
        "    s += float(c[n].sum())\n"
    ),
    "safetensors.safe_open": (
        "import pathlib\n"
        "from safetensors import safe_open\n"
        "s = 0.0\n"
        "for shard in sorted(pathlib.Path(P).glob('*.safetensors')):\n"
        "    with safe_open(str(shard), 'pt') as f:\n"
        "        for n in f.keys():\n"
        "            s += float(f.get_tensor(n).sum())\n"
    ),
}


def build(dest: Path, gb: float) -> int:
    from splice.io import CheckpointWriter

    rows = 4096
    n = int(gb * 1e9 / (rows * 4096 * 4)) + 1
    with CheckpointWriter(dest, max_shard_size="400MB") as w:
        for i in range(n):
            w.write(f"model.layers.{i}.weight", torch.randn(rows, 4096))
    return sum(p.stat().st_size for p in dest.glob("*.safetensors"))


_PRE = IMPORT + "import time, torch, splice.io, safetensors\nt0 = time.perf_counter()\n"
_POST = "\nprint(time.perf_counter() - t0, peak_rss_mib())"


def measure(code: str, path: Path) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; return its read time (s) and peak RSS (MiB)."""
    out = subprocess.run(
        [sys.executable, "-c", f"P = {str(path)!r}\n" + _PRE + code + _POST],
        check=True,
        capture_output=True,
        text=True,
    )
    wall, rss = out.stdout.split()
    return float(wall), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        dest = Path(tmp) / "ckpt"
        size = build(dest, args.gb)
        print(
            f"checkpoint: {size / 2**20:.0f} MiB in {len(list(dest.glob('*.safetensors')))} shards"
        )
        baseline = measure("", dest)[1]
        print(f"baseline (imports only): peak RSS {baseline:.0f} MiB")
        for name, code in READERS.items():
            wall, rss = measure(code, dest)
            print(
                f"{name:>22}: {wall:6.1f} s, peak RSS {rss:6.0f} MiB "
                f"(+{rss - baseline:.0f} MiB over imports; checkpoint {size / 2**20:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
