"""atheris fuzz target: untrusted checkpoint bytes must only ever raise ``SpliceError``.

Smoke run (what CI does when atheris installs)::

    .venv/bin/python fuzz/fuzz_checkpoint.py -max_total_time=60 -rss_limit_mb=2048

Long run, keeping a growing corpus and any crash files::

    mkdir -p fuzz/corpus
    .venv/bin/python fuzz/fuzz_checkpoint.py fuzz/corpus -max_total_time=3600

The first input byte picks the target: a raw ``.safetensors`` file, a sharded dir whose index
JSON is fuzzed, or a PEFT adapter dir whose ``adapter_config.json`` is fuzzed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris
import torch
from safetensors.torch import save_file

with atheris.instrument_imports(include=["splice"]):
    from splice.deltas import load_deltas
    from splice.errors import SpliceError
    from splice.io import open_checkpoint

WORK = Path(tempfile.mkdtemp(prefix="splice-fuzz-"))
SHARDED, PEFT = WORK / "sharded", WORK / "peft"
SHARDED.mkdir()
PEFT.mkdir()
save_file({"a": torch.ones(2), "b": torch.zeros(3)}, SHARDED / "s1.safetensors")
save_file(
    {
        "base_model.model.l.lora_A.weight": torch.ones(2, 4),
        "base_model.model.l.lora_B.weight": torch.ones(3, 2),
    },
    PEFT / "adapter_model.safetensors",
)


def _read_all(path: Path) -> None:
    ckpt = open_checkpoint(path)
    for name in ckpt:
        assert tuple(ckpt[name].shape) == ckpt.info(name).shape
    if ckpt.format == "peft":
        load_deltas(path)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    if mode == 0:
        target = WORK / "f.safetensors"
        target.write_bytes(rest)
    elif mode == 1:
        target = SHARDED
        (SHARDED / "model.safetensors.index.json").write_bytes(rest)
    else:
        target = PEFT
        (PEFT / "adapter_config.json").write_bytes(rest)
    try:
        _read_all(target)
    except SpliceError as e:
        assert "\n" not in str(e)


def seeds() -> list[bytes]:
    """A few valid inputs per mode, so the fuzzer starts from the accepted formats."""
    good = WORK / "seed.safetensors"
    save_file({"w": torch.ones(2, 2)}, good)
    index = json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})
    config = json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"})
    return [b"\x00" + good.read_bytes(), b"\x01" + index.encode(), b"\x02" + config.encode()]


if __name__ == "__main__":
    seed_dir = WORK / "seeds"
    seed_dir.mkdir()
    for i, s in enumerate(seeds()):
        (seed_dir / f"seed{i}").write_bytes(s)
    args = sys.argv + (
        [str(seed_dir)] if not any(not a.startswith("-") for a in sys.argv[1:]) else []
    )
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
