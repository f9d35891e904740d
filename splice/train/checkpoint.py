"""Training checkpoints: trainable tensors, optimizer and RNG state, step — all safetensors +
JSON (no pickle), written to a temp dir and renamed, so Ctrl-C never leaves half a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.io.atomic import atomic_dir

__all__ = ["load_checkpoint", "save_checkpoint"]

TENSORS = "state.safetensors"
META = "state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: dict[str, Any],
) -> None:
    """Write ``path`` atomically: a temp dir beside it, renamed over the previous checkpoint."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"param.{k}": v.detach() for k, v in params.items()}
    tensors |= opt_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), **info}
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta, indent=1))


def load_checkpoint(
    path: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``info`` dict."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / TENSORS))
    meta = json.loads((path / META).read_text())
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(params):
        raise SpliceError(
            "checkpoint holds different trainable parameters",
            where=str(path),
            fix="resume with the settings it was made with, or start without --resume",
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta.pop("optimizer")))
    scheduler.load_state_dict(meta.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
