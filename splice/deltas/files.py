"""Delta files: save and load deltas losslessly (a splice delta file or a PEFT LoRA dir).

A splice delta file is one ``.safetensors`` file: each delta's tensors under
``<tensor name>::<field>``, and its kind and scalars in the metadata (format
:data:`DELTA_FORMAT`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.deltas.peft import peft_lowrank_deltas
from splice.deltas.types import Delta, Dense
from splice.deltas.wrapper import wrapper_map
from splice.errors import SpliceError
from splice.io.peft import peft_full_tensors

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DELTA_FORMAT", "load_deltas", "save_deltas"]

DELTA_FORMAT = "splice.deltas/1"


def save_deltas(deltas: Mapping[str, Delta], path: str | Path) -> Path:
    """Write deltas to one ``.safetensors`` file; kinds and scalars go in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    flat: dict[str, Tensor] = {}
    index: dict[str, dict[str, Any]] = {}
    for name, d in deltas.items():
        for field_name, t in d.tensors().items():
            flat[f"{name}::{field_name}"] = t.detach().contiguous().cpu()
        index[name] = {"kind": d.kind, **d.meta()}
    meta = {"format": DELTA_FORMAT, "deltas": json.dumps(index)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(flat, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_deltas(path: str | Path, *, base: Mapping[str, Tensor] | None = None) -> dict[str, Delta]:
    """Load deltas from a splice delta file or a PEFT LoRA adapter directory.

    A PEFT dir yields :class:`LowRank` deltas keyed by the base model's tensor names; its
    ``modules_to_save`` tensors (full weights) become :class:`Dense` deltas against ``base``.
    With ``base`` given, every target must exist in it with the delta's shape (names are
    mapped across a task-head wrapper prefix, :func:`~splice.deltas.wrapper.wrapper_map`),
    and the base's ``config.json`` (a :class:`~splice.io.Checkpoint` of a model dir) tells
    GPT-2 ``Conv1D`` modules from ``nn.Linear`` ones.

    Raises:
        SpliceError: not a delta file / adapter, full modules without ``base``, target missing
            from ``base`` or of another shape.
    """
    from splice.io import open_checkpoint

    path = Path(path)
    ckpt = open_checkpoint(path)
    deltas: dict[str, Delta]
    if ckpt.format == "peft":
        model_type = (getattr(base, "config", None) or {}).get("model_type")
        deltas = dict(peft_lowrank_deltas(ckpt, model_type=model_type))
        full = peft_full_tensors(ckpt)
        wrapper = wrapper_map(list(deltas), base, model_type) if base is not None else None
        if wrapper is not None:  # trained on the task-head class, base saved bare (or reverse)
            deltas = {wrapper(n): d for n, d in deltas.items()}
            full = {wrapper.to_base(n, base): t for n, t in full.items()}
        if full and base is None:
            raise SpliceError(
                f"adapter stores {len(full)} full module tensor(s) (modules_to_save), "
                f"e.g. {next(iter(full))!r}",
                where=str(path),
                fix="pass base= (the base checkpoint) to express them as deltas",
            )
        for name, value in full.items():
            if base is not None and name in base:
                deltas[name] = Dense(value.to(base[name].dtype) - base[name])
            else:
                deltas[name] = Dense(value)
    else:
        deltas = _load_splice_deltas(ckpt, path)
    if base is not None:
        _check_targets(deltas, base, path)
    return deltas


def _load_splice_deltas(ckpt: Any, path: Path) -> dict[str, Delta]:
    meta = ckpt.metadata
    if meta.get("format") != DELTA_FORMAT:
        raise SpliceError(
            "not a splice delta file or PEFT adapter dir",
            where=str(path),
            fix="create one with splice.save_deltas or point at an adapter dir",
        )
    index = json.loads(meta["deltas"])
    deltas: dict[str, Delta] = {}
    for name, info in index.items():
        info = dict(info)
        cls = _delta_kind(info.pop("kind"), name, path)
        parts = {key.split("::", 1)[1]: ckpt[key] for key in ckpt.names_with_prefix(f"{name}::")}
        deltas[name] = cls.from_parts(parts, info)
    return deltas


def _delta_kind(kind: str, name: str, path: Path) -> type[Delta]:
    """The Delta class stored as ``kind`` (every kind is defined in :mod:`splice.deltas.types`)."""
    cls = Delta._kinds.get(kind)
    if cls is None:
        raise SpliceError(f"unknown delta kind {kind!r} for {name!r}", where=str(path))
    return cls


def _check_targets(deltas: Mapping[str, Delta], base: Mapping[str, Tensor], path: Path) -> None:
    for name, d in deltas.items():
        if name not in base:
            raise SpliceError(
                f"delta target {name!r} is not in the base model, nor under a task-head "
                "wrapper prefix (such as 'bert.')",
                where=str(path),
                fix="use the base model this adapter was trained on",
            )
        shape = base.info(name).shape if hasattr(base, "info") else tuple(base[name].shape)
        if tuple(d.shape) != tuple(shape):
            raise SpliceError(
                f"delta for {name!r} has shape {tuple(d.shape)}, base has {tuple(shape)}",
                where=str(path),
                fix="use the base model this adapter was trained on",
            )
