"""Checkpoint and adapter summaries and per-tensor diffs behind ``splice inspect`` (printed by
:mod:`splice.cli.inspect`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice._names import layer_index
from splice.io import open_checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["diff_report", "summarize"]


class _Applied(Mapping[str, "torch.Tensor"]):
    """``base + ΔW`` for the names an adapter touches, the base tensor elsewhere (lazy)."""

    def __init__(self, base: Mapping[str, torch.Tensor], deltas: Mapping[str, Any]) -> None:
        self.base, self.deltas = base, deltas

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.base[name]
        return t + self.deltas[name].materialize(t.dtype) if name in self.deltas else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def summarize(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Format, files, tensor/parameter counts, bytes and dtypes of a checkpoint (headers only)."""
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0})
    layers = set()
    for info in ckpt.infos():
        d = dtypes[info.dtype_name]
        d["tensors"] += 1
        d["params"] += info.numel
        if (layer := layer_index(info.name)) is not None:
            layers.add(layer)
    cfg = ckpt.config or {}
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size")
    extra: dict[str, Any] = {}
    if ckpt.format == "peft":
        from splice.deltas import peft_lowrank_deltas

        keys = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
        lora = peft_lowrank_deltas(ckpt)
        extra["lora"] = {
            "modules": len(lora),
            "ranks": sorted({d.rank for d in lora.values()}),
            "scales": sorted({d.scale for d in lora.values()}),
            "targets": sorted(lora)[:5],
        }
    return {
        **extra,
        "path": str(ckpt.path),
        "format": ckpt.format,
        "files": [str(f.name) for f in ckpt.files],
        "tensors": len(ckpt),
        "params": ckpt.num_params,
        "bytes": ckpt.total_bytes,
        "layers": len(layers),
        "dtypes": dict(dtypes),
        "config": {k: cfg[k] for k in keys if k in cfg},
        "metadata": {k: v for k, v in ckpt.metadata.items() if len(v) <= 200},
    }


def diff_report(a: str | Path, b: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Per-tensor differences ``b - a``: relative norm, max |Δ|, grouped by layer.

    Reads one pair of tensors at a time; names or shapes present in one side only are listed.
    """
    ca = open_checkpoint(a, allow_pickle=allow_pickle)
    cb: Mapping[str, torch.Tensor] = open_checkpoint(b, allow_pickle=allow_pickle)
    if cb.format == "peft":  # an adapter: compare the base with base + ΔW
        from splice.deltas import load_deltas

        cb = _Applied(ca, load_deltas(b, base=ca))
    rows, shape_mismatch = [], []
    per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name in ca:
        if name not in cb:
            continue
        ta, tb = ca[name].double(), cb[name].double()
        if ta.shape != tb.shape:
            shape_mismatch.append({"name": name, "a": list(ta.shape), "b": list(tb.shape)})
            continue
        diff_sq = float((tb - ta).pow(2).sum())
        base_sq = float(ta.pow(2).sum())
        max_abs = float((tb - ta).abs().max()) if ta.numel() else 0.0
        rel = (diff_sq**0.5) / (base_sq**0.5) if base_sq > 0 else (0.0 if diff_sq == 0 else 1.0)
        rows.append({"name": name, "rel_diff": rel, "max_abs": max_abs, "equal": diff_sq == 0})
        layer = layer_index(name)
        acc = per_layer["other" if layer is None else str(layer)]
        acc[0] += diff_sq
        acc[1] += base_sq

    def _key(k: str) -> tuple[int, int]:
        return (0, int(k)) if k.isdigit() else (1, 0)

    return {
        "a": str(ca.path),
        "b": str(b),
        "compared": len(rows),
        "differing": sum(not r["equal"] for r in rows),
        "only_in_a": [n for n in ca if n not in cb],
        "only_in_b": [n for n in cb if n not in ca],
        "shape_mismatch": shape_mismatch,
        "by_layer": {
            k: (d**0.5) / (s**0.5) if s > 0 else 0.0
            for k, (d, s) in sorted(per_layer.items(), key=lambda kv: _key(kv[0]))
        },
        "tensors": rows,
    }
