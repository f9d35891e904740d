"""Uptraining in resumable segments for ``benchmarks/recursive_smollm2.py``: one ``splice
train`` run (one LR schedule over all its steps) cut at checkpoints, so a long row fits several
commands of a few minutes each, and its held-out curve is read at chosen steps.

``segments(cfg, stops, budget_s, on_eval)`` trains ``cfg`` from its checkpoint (if any) and
pauses at each step of ``stops`` (multiples of ``cfg.checkpoint_every``) to call
``on_eval(step, checkpoint_dir)``. ``splice.train`` writes a boundary step's checkpoint before
its step hook, so the hook stops the run right there and no step is redone (batches are a
function of the step index and the checkpoint holds parameters, AdamW moments, the LR schedule
and the RNG, so the resumed run equals an unbroken one — tested in
``tests/convert/test_recursive_uptrain.py``). With ``budget_s`` it also pauses at the first
boundary after which the next segment would end past ``budget_s`` seconds of this process, and
returns None: the same command resumes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class _Pause(Exception):
    """Raised from the step hook of the boundary whose checkpoint was just written."""


def checkpoint_step(out: Path) -> int:
    """The step of ``out/checkpoint`` (0 when there is none)."""
    state = out / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the parameters of a ``splice train`` checkpoint into ``model`` (all of them: a
    full fine-tune's checkpoint holds every parameter)."""
    from safetensors.torch import load_file

    saved = {
        k.removeprefix("param."): v
        for k, v in load_file(str(checkpoint / "state.safetensors")).items()
        if k.startswith("param.")
    }
    params = dict(model.named_parameters())
    if set(saved) != set(params):
        missing = sorted(set(params) ^ set(saved))[:3]
        raise ValueError(f"checkpoint {checkpoint} does not match the model: {missing}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def segments(
    cfg: Any,
    stops: list[int],
    budget_s: float | None,
    on_eval: Callable[[int, Path], None],
    *,
    reserve_s: float = 60.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict | None:
    """Train ``cfg`` (a full ``TrainConfig`` with ``checkpoint_every``) to its end, resuming
    from ``cfg.out/checkpoint`` and pausing at ``stops``; returns ``splice train``'s metrics, or
    None when ``budget_s`` ran out first (the checkpoint is kept). ``reserve_s``: the seconds
    kept for what follows a segment (an evaluation, the final save)."""
    from splice.train import train

    every = cfg.checkpoint_every
    if not every or any(s % every for s in stops):
        raise ValueError(f"stops {stops} must be multiples of checkpoint_every={every}")
    cfg = cfg.model_copy(update={"resume": True})
    start, per_step = clock(), [0.0]  # seconds per step, as last measured
    while True:
        done = checkpoint_step(cfg.out)
        pending = [s for s in stops if done < s < cfg.steps]
        paused, times = {"at": None, "budget": False}, [clock()]

        def hook(step: int, loss: float, pending=pending, paused=paused, times=times) -> None:
            times.append(clock())
            if step % every or step >= cfg.steps:
                return
            per_step[0] = (times[-1] - times[0]) / (len(times) - 1)
            late = clock() - start + every * per_step[0] + reserve_s
            if pending and step == pending[0]:
                paused["at"] = step
            elif budget_s is not None and late > budget_s:
                paused["at"], paused["budget"] = step, True
            if paused["at"] is not None:
                raise _Pause

        try:
            return train(cfg, on_step=hook)
        except _Pause:
            pass
        if paused["budget"]:
            return None
        on_eval(paused["at"], cfg.out / "checkpoint")
        late = clock() - start + every * per_step[0] + reserve_s
        if budget_s is not None and late > budget_s:
            return None
