"""Resumable size sweeps: each layer's variants kept on disk as they are made (issue #28).

A size-targeted run (:func:`~splice.compress.quantize_sizes`) spends most of its time making
every layer's variants (AdaQuant at each bit option). Given a checkpoint directory, each
layer's variants and report go to ``layer-<i>.pt`` as soon as they are made, and the
sensitivity table to ``table.pt``; a later run given the same directory loads them instead of
making them again. The results are the same: in parallel mode a layer's variants depend only
on the float model, the data and the config (AdaQuant's draws are seeded per layer).
``run.json`` holds the run's fingerprint (config, layer order, batch count) and the seconds
spent so far; a run with another fingerprint refuses the directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splice.errors import SpliceError

__all__ = ["Checkpoint"]


class Checkpoint:
    """The per-layer variants and the sensitivity table of one size sweep, in ``path``."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        meta = self.path / "run.json"
        self.prior = 0.0
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved["fingerprint"] != self.fingerprint:
                raise SpliceError(
                    "the checkpoint directory holds another run",
                    where=str(self.path),
                    fix="pass a new directory (or delete it) for a different config or data",
                )
            self.prior = float(saved["seconds"])
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds spent on this sweep so far, over every run that used the directory."""
        return self.prior + time.perf_counter() - self.started

    def _save(self, name: str, obj: Any) -> None:
        tmp = self.path / f"{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.path / name)
        meta = {"fingerprint": self.fingerprint, "seconds": self.seconds}
        (self.path / "run.json.tmp").write_text(json.dumps(meta))
        os.replace(self.path / "run.json.tmp", self.path / "run.json")

    def layer(self, i: int, name: str) -> tuple[dict[int, dict], dict[str, Any]] | None:
        """``(bits → variant state, report fields)`` of layer ``i`` if saved, else None."""
        file = self.path / f"layer-{i}.pt"
        if not file.is_file():
            return None
        got = torch.load(file, weights_only=True)
        if got["name"] != name:
            raise SpliceError(
                f"checkpoint layer {i} is {got['name']}, not {name}", where=str(self.path)
            )
        return got["variants"], got["report"]

    def save_layer(self, i: int, name: str, variants: dict[int, dict], report: Any) -> None:
        self._save(f"layer-{i}.pt", {"name": name, "variants": variants, "report": asdict(report)})

    def table(self) -> tuple[np.ndarray, float] | None:
        """The sensitivity table and its base loss if saved, else None."""
        file = self.path / "table.pt"
        if not file.is_file():
            return None
        got = torch.load(file, weights_only=True)
        return got["table"].numpy(), float(got["base"])

    def save_table(self, table: np.ndarray, base: float) -> None:
        self._save("table.pt", {"table": torch.from_numpy(table), "base": base})
