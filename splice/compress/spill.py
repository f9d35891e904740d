"""The float model's layer outputs on disk: one forward per calibration batch records the output
of every layer, each is read back when its layer is fitted (spec other.md §4.9 a).

Sequential AdaQuant needs layer ``ℓ``'s float outputs next to its inputs from the partly
quantized model. Holding float forwards paused at ``ℓ`` (:class:`~splice.compress.lockstep.
Lockstep`) would keep their live tensors in memory too — the layer's float inputs among them;
re-running the float model up to each layer costs ``L/2`` forwards. Here the float model runs
once per batch, its outputs go to files in a temporary directory (one per layer, float32 as
computed, so results are those of a fresh capture bit for bit) and only the layer being fitted
is read back. Only the first call of a layer in a forward is recorded (as
:func:`~splice.compress.capture.capture` does).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.compress.capture import Forward

__all__ = ["Spill"]


class Spill:
    """The outputs of the layers ``names`` of ``model`` on ``batches``, on disk under
    ``directory`` (default: the system's temporary directory); :meth:`run` records them."""

    def __init__(self, names: Sequence[str], directory: str | Path | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="splice-spill-", dir=directory)
        self.root = Path(self.tmp.name)
        self.files = {name: self.root / f"{i}.bin" for i, name in enumerate(names)}
        self.index: dict[str, list[tuple[int, torch.Size, torch.dtype, torch.device]]] = {
            name: [] for name in names
        }

    @torch.no_grad()
    def run(self, model: nn.Module, batches: Sequence[Any], forward: Forward) -> list[Any]:
        """``forward(model, batch)`` for each batch (returned, detached), recording every
        layer's first output in it."""
        seen: set[str] = set()
        sinks = {name: open(path, "wb") for name, path in self.files.items()}  # noqa: SIM115

        def hook(name: str):
            def record(module: nn.Module, args: tuple, out: Tensor) -> None:
                if name in seen:
                    return
                seen.add(name)
                t = out.detach().contiguous()
                self.index[name].append((sinks[name].tell(), t.shape, t.dtype, t.device))
                sinks[name].write(t.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

            return record

        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in self.files]
        results = []
        try:
            for batch in batches:
                seen.clear()
                out = forward(model, batch)
                results.append(out.detach() if isinstance(out, Tensor) else out)
        finally:
            for h in handles:
                h.remove()
            for f in sinks.values():
                f.close()
        return results

    def outputs(self, name: str) -> list[Tensor]:
        """Layer ``name``'s recorded outputs, one tensor per batch (a batch that did not reach
        the layer has none)."""
        out = []
        with open(self.files[name], "rb") as f:
            for offset, shape, dtype, device in self.index[name]:
                t = torch.empty(shape, dtype=dtype)
                f.seek(offset)
                f.readinto(t.reshape(-1).view(torch.uint8).numpy())
                out.append(t.to(device))
        return out

    def close(self) -> None:
        self.tmp.cleanup()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
