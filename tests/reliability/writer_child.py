"""Child process for fault injection: writes a known checkpoint, optionally failing on purpose.

Usage: ``python writer_child.py DEST VERSION FAULT`` where FAULT is one of
``none``, ``slow`` (sleeps between tensors so the parent can signal it at random points),
``kill_at_shard`` (SIGKILL itself when the 2nd shard is assembled), ``kill_at_index`` (when the
index is written), ``kill_at_swap`` (at the atomic exchange with the old version),
``kill_at_rename_fallback`` (between the two renames of the no-``renameat2`` fallback),
``enospc`` (the 7th tensor write fails with ENOSPC), ``eacces`` (creating dirs fails with EACCES).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

from splice.io import CheckpointWriter, atomic, writer

N_TENSORS = 12


def expected(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {f"layers.{i}.weight": torch.randn(64, 64, generator=g) for i in range(N_TENSORS)}


def _die(*_: object, **__: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str) -> None:
    if fault == "kill_at_shard":
        real = writer._Shard.finish
        calls = {"n": 0}

        def finish(self, final, metadata):
            calls["n"] += 1
            if calls["n"] == 2:
                _die()
            return real(self, final, metadata)

        writer._Shard.finish = finish
    elif fault == "kill_at_index":
        real_write_text = Path.write_text

        def write_text(self, *a, **k):
            if self.name == "model.safetensors.index.json":
                _die()
            return real_write_text(self, *a, **k)

        Path.write_text = write_text
    elif fault == "kill_at_swap":
        atomic._exchange = _die
    elif fault == "kill_at_rename_fallback":
        atomic._exchange = lambda a, b: False
        real_rename = Path.rename

        def rename(self, target):
            if Path(target).name == DEST.name:
                _die()
            return real_rename(self, target)

        Path.rename = rename
    elif fault == "enospc":
        real_add = writer._Shard.add
        calls = {"n": 0}

        def add(self, name, t):
            calls["n"] += 1
            if calls["n"] == 7:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_add(self, name, t)

        writer._Shard.add = add
    elif fault == "eacces":

        def mkdir(self, *a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        Path.mkdir = mkdir


if __name__ == "__main__":
    DEST, version, fault = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    install_fault(fault)
    from splice.errors import SpliceError

    try:
        with CheckpointWriter(DEST, max_shard_size=64 * 64 * 4 * 3, force=True) as w:
            print("started", flush=True)
            for name, t in expected(version).items():
                w.write(name, t)
                if fault == "slow":
                    time.sleep(0.02)
    except SpliceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
