"""Shared pieces of the continual merges: the base state, the task sequence, norms."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from splice.errors import SpliceError
from splice.merge.learned._functional import resolve_device

__all__ = ["base_state", "global_norm", "linear_weights", "sequence"]


def base_state(
    base: nn.Module | Mapping[str, Tensor], device: str | torch.device | None
) -> tuple[dict[str, Tensor], torch.device]:
    """The base tensors (detached, float) and the compute device."""
    if isinstance(base, nn.Module):
        dev = resolve_device(base, device)
        state = dict(base.named_parameters(remove_duplicate=False))
        state.update(base.named_buffers(remove_duplicate=False))
    else:
        state = dict(base)
        dev = torch.device(device) if device is not None else next(iter(state.values())).device
    return {n: t.detach().to(dev) for n, t in state.items() if t.is_floating_point()}, dev


_TABLES = ("wte", "wpe", "shared")  # embedding tables without "embed" in their name


def linear_weights(base: nn.Module | Mapping[str, Tensor]) -> set[str]:
    """The names OPCM projects: the ``nn.Linear`` weights (FusionBench).

    With a module the module type decides (an attention's ``out_proj`` is an ``nn.Linear``;
    its packed ``in_proj_weight``, embeddings, GPT-2 ``Conv1D`` and bare parameters are not).
    A plain state dict has no types, so a name/shape rule stands in: a 2-D tensor whose name
    ends in ``weight`` after a dot (``….weight``: not ``in_proj_weight``, ``proj`` or
    ``positional_embedding``) and none of whose dotted parts contains ``embed`` or is
    ``wte``, ``wpe`` or ``shared`` (embedding tables). It matches the module rule on the usual
    layouts, except GPT-2 ``Conv1D`` weights, which it counts as linear.
    """
    if isinstance(base, nn.Module):
        return {
            f"{n}.weight" if n else "weight"
            for n, m in base.named_modules()
            if isinstance(m, nn.Linear)
        }
    return {n for n, t in base.items() if t.dim() == 2 and _linear_name(n)}


def _linear_name(name: str) -> bool:
    *parts, last = name.split(".")
    if last != "weight" or not parts:
        return False
    return not any(p in _TABLES or "embed" in p for p in parts)


def sequence(
    deltas: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
    base: Mapping[str, Tensor],
) -> Iterator[tuple[str, dict[str, Tensor]]]:
    """``(task, {name: ΔW})`` in order, each ΔW materialised on the base's device (float32+).

    Raises:
        SpliceError: a delta names a tensor the base lacks or has another shape.
    """
    items = deltas.items() if isinstance(deltas, Mapping) else deltas
    for task, d in items:
        out: dict[str, Tensor] = {}
        for n, v in d.items():
            if n not in base:
                raise SpliceError(f"task {task!r}: delta target not in the base", where=n)
            value = v.materialize() if hasattr(v, "materialize") else v
            if tuple(value.shape) != tuple(base[n].shape):
                raise SpliceError(
                    f"task {task!r}: delta shape {tuple(value.shape)} differs from the base's "
                    f"{tuple(base[n].shape)}",
                    where=n,
                )
            dtype = torch.promote_types(base[n].dtype, torch.float32)
            out[n] = value.detach().to(base[n].device, dtype)
        yield task, out


def global_norm(tensors: Iterable[Tensor]) -> float:
    """``‖·‖₂`` over all entries of all tensors (float64 accumulation)."""
    return float(sum(t.double().pow(2).sum() for t in tensors)) ** 0.5
