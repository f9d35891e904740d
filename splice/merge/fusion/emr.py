"""EMR-Merging: elect, mask, rescale (Huang et al., NeurIPS 2024; FusionBench ``EMRMerging``).

Not one merged model but one *shared* task vector plus a few bits per task, from which each
task's model is rebuilt at load time:

1. Elect a unified task vector: per entry the sign ``γ = sign(Σ_t τ_t)`` and the magnitude
   ``ε = max_t |τ_t|`` over the tasks whose ``τ_t`` agrees with ``γ``; ``τ_uni = γ·ε``.
2. Masks: ``M_t = (τ_t ⊙ τ_uni > 0)`` — the entries where task t agrees with the elected sign.
3. Rescalers: ``λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|`` over the whole model, so the rebuilt task
   vector keeps task t's mean magnitude.

Task t's model is ``θ₀ + λ_t·M_t ⊙ τ_uni``. It equals the expert exactly when the masks and
rescaler allow it: a single task, or task vectors with disjoint supports (then ``λ_t = 1``).

:class:`EMRModel` stores this compactly — ``τ_uni`` in the base dtype, each mask as packed bits
(``numel/8`` bytes per task) and one float per task — in a directory written by
:meth:`EMRModel.save` (``emr.safetensors`` + ``emr.json``); :meth:`EMRModel.weights` rebuilds a
task's tensors on load. Data-free; no hyperparameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["EMRModel", "emr_merge", "pack_bits", "unpack_bits"]

_FORMAT = "splice-emr/1"


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as ``ceil(numel/8)`` uint8 bytes (big-endian bit order per byte)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits` for a tensor of ``shape``."""
    n = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.cpu().numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


@dataclass
class EMRModel:
    """The unified task vector, per-task packed masks and per-task rescalers."""

    tasks: tuple[str, ...]
    unified: dict[str, Tensor]
    masks: dict[str, dict[str, Tensor]]  # task -> name -> packed uint8
    scales: dict[str, float]

    def task_vector(self, task: str) -> dict[str, Tensor]:
        """``λ_t · M_t ⊙ τ_uni`` per tensor name."""
        if task not in self.scales:
            raise SpliceError(f"EMR: no task {task!r}", fix=f"tasks are {list(self.tasks)}")
        out = {}
        for n, u in self.unified.items():
            mask = unpack_bits(self.masks[task][n], tuple(u.shape)).to(u.device)
            out[n] = (self.scales[task] * u.double() * mask).to(u.dtype)
        return out

    def weights(self, base: Mapping[str, Tensor], task: str) -> dict[str, Tensor]:
        """Task ``task``'s tensors: ``base + λ_t·M_t ⊙ τ_uni`` for every name EMR covers."""
        tv = self.task_vector(task)
        return {n: base[n] + tv[n].to(base[n].dtype) for n in tv}

    def nbytes(self) -> dict[str, int]:
        """Storage: the unified vector, all masks, all rescalers (bytes)."""
        uni = sum(u.numel() * u.element_size() for u in self.unified.values())
        masks = sum(m.numel() for per in self.masks.values() for m in per.values())
        return {"unified": uni, "masks": masks, "scales": 8 * len(self.scales)}

    def extra_params(self) -> float:
        """What the per-task rebuild stores beside one dense model (every mask and rescaler),
        counted as float32 parameters: their bytes / 4."""
        size = self.nbytes()
        return (size["masks"] + size["scales"]) / 4

    def save(self, directory: str | Path) -> Path:
        """Write ``emr.safetensors`` (``unified/<name>``, ``mask/<task>/<name>``) and
        ``emr.json`` (format, tasks, rescalers, shapes) to ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"unified/{n}": u.contiguous().cpu() for n, u in self.unified.items()}
        for t, per in self.masks.items():
            tensors.update({f"mask/{t}/{n}": m for n, m in per.items()})
        save_file(tensors, str(out / "emr.safetensors"))
        shapes = {n: list(u.shape) for n, u in self.unified.items()}
        meta = {
            "format": _FORMAT,
            "tasks": list(self.tasks),
            "scales": self.scales,
            "shapes": shapes,
        }
        (out / "emr.json").write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> EMRModel:
        """Read a directory written by :meth:`save`.

        Raises:
            SpliceError: no ``emr.json`` / another format, or a tensor missing.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "emr.json").is_file():
            raise SpliceError("not an EMR directory (no emr.json)", where=str(d))
        meta: dict[str, Any] = json.loads((d / "emr.json").read_text())
        if meta.get("format") != _FORMAT:
            raise SpliceError(f"EMR format {meta.get('format')!r}, not {_FORMAT}", where=str(d))
        raw = load_file(str(d / "emr.safetensors"))
        tasks = tuple(meta["tasks"])
        try:
            unified = {n: raw[f"unified/{n}"] for n in meta["shapes"]}
            masks = {t: {n: raw[f"mask/{t}/{n}"] for n in meta["shapes"]} for t in tasks}
        except KeyError as e:
            raise SpliceError(f"EMR directory lacks tensor {e.args[0]}", where=str(d)) from None
        return cls(tasks, unified, masks, {t: float(meta["scales"][t]) for t in tasks})


def emr_merge(deltas: Mapping[str, Mapping[str, Tensor]]) -> EMRModel:
    """Elect, mask and rescale ``deltas`` ({task: {tensor name: ΔW}}; a task without a name
    contributes zeros there). Works in float64; the unified vector keeps the deltas' dtype.

    Raises:
        SpliceError: no tasks, or shapes that differ between tasks.
    """
    if not deltas:
        raise SpliceError("EMR: no task deltas given", fix="pass {task: {tensor name: ΔW}}")
    tasks = tuple(deltas)
    names = list(dict.fromkeys(n for d in deltas.values() for n in d))
    unified: dict[str, Tensor] = {}
    masks: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
    abs_sum = dict.fromkeys(tasks, 0.0)
    kept_sum = dict.fromkeys(tasks, 0.0)
    for n in names:
        like = next(d[n] for d in deltas.values() if n in d)
        rows = []
        for t in tasks:
            v = deltas[t].get(n)
            v = torch.zeros_like(like) if v is None else v.detach()
            if v.shape != like.shape:
                raise SpliceError(f"EMR: task {t!r} delta shape {tuple(v.shape)} differs", where=n)
            rows.append(v.double().cpu())
        tau = torch.stack(rows)
        sign = torch.sign(tau.sum(0))
        agree = tau * sign > 0
        uni = sign * torch.where(agree, tau.abs(), torch.zeros_like(tau)).amax(0)
        unified[n] = uni.to(like.dtype)
        for i, t in enumerate(tasks):
            mask = tau[i] * uni > 0
            masks[t][n] = pack_bits(mask)
            abs_sum[t] += float(tau[i].abs().sum())
            kept_sum[t] += float((uni * mask).abs().sum())
    scales = {t: abs_sum[t] / kept_sum[t] if kept_sum[t] > 0 else 0.0 for t in tasks}
    return EMRModel(tasks, unified, masks, scales)
