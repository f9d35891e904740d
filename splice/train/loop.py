"""The one training loop: every fine-tune in splice takes its optimizer steps here.

``splice train`` (:mod:`splice.train.hf`), the benchmark's task fine-tunes
(:mod:`splice.bench.finetune`) and the adapter benchmarks build their model, data order and
optimizer, and hand the loop a function from a micro-batch index to its loss. The loop owns
what happens around it: gradient accumulation, the adapters' auxiliary losses, bf16 autocast,
gradient clipping, DDP gradient sync and loss averaging, the optimizer and LR schedule steps,
progress, periodic checkpoints and the step count a resumed run continues from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["LoopState", "TrainStep", "distributed", "fit", "minimise"]

MicroLoss = Callable[[int], tuple[Tensor, int]]
"""Micro-batch ``i`` → (its loss, its number of examples); the loss is logged as returned."""


@dataclass
class TrainStep:
    """One optimizer step: ``grad_accum`` micro-batches, then clip, step and zero the grads.

    ``aux`` is the adapted model whose method adds an auxiliary loss (MoLA balance, EPT
    contrast) to each micro-batch's; it is minimised, not logged. Its method also acts after
    each optimizer step, before the gradients are zeroed (AdaLoRA's rank allocation).
    ``params`` (default: the optimizer's) are clipped to a total gradient norm of
    ``grad_clip`` (0: off), in their given order (the norm's summation order). ``ddp`` is the
    DistributedDataParallel wrapper, if any: it syncs gradients on the last micro-batch only;
    the logged loss is the mean over ranks.
    """

    loss: MicroLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    params: Sequence[nn.Parameter] = ()
    grad_accum: int = 1
    grad_clip: float = 0.0
    aux: nn.Module | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ddp: nn.parallel.DistributedDataParallel | None = None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, step: int) -> tuple[float, int]:
        """Take optimizer step ``step`` (micro-batches ``step·grad_accum …``); returns its
        mean loss and the examples it saw on all ranks."""
        from splice.adapters import aux_loss
        from splice.adapters.inject import after_step

        world = 1 if self.ddp is None else torch.distributed.get_world_size()
        accum, losses, seen = self.grad_accum, [], 0
        for micro in range(accum):
            sync = self.ddp is None or micro == accum - 1
            with nullcontext() if sync else self.ddp.no_sync(), self.autocast():
                loss, examples = self.loss(step * accum + micro)
                extra = None if self.aux is None else aux_loss(self.aux)
                total = loss if extra is None else loss + extra
                (total / accum if accum > 1 else total).backward()
            losses.append(loss.detach())
            seen += examples * world
        if self.grad_clip > 0:
            params = self.params or [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.aux is not None:
            after_step(self.aux, step)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0  # read after the step: no device sync in its middle
        for loss in losses:
            step_loss += loss.item() / accum
        if self.ddp is not None:  # log the mean over ranks, not this rank's slice
            mean = torch.tensor(step_loss, device=self.device)
            torch.distributed.all_reduce(mean)
            step_loss = mean.item() / world
        return step_loss, seen


@dataclass
class LoopState:
    """Where a run stands: the steps done (a resumed run starts from its checkpoint's) and
    their losses; examples seen and seconds spent in this process."""

    step: int = 0
    history: list[float] = field(default_factory=list)
    seen: int = 0
    seconds: float = 0.0


def fit(
    step: TrainStep,
    steps: int,
    *,
    state: LoopState | None = None,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint: Callable[[LoopState], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
) -> LoopState:
    """Run ``step`` until ``steps`` optimizer steps are done; returns the final state.

    After every step: the progress bar (loss, examples/s), every ``checkpoint_every`` steps
    but the last ``checkpoint(state)``, then ``on_step(step, loss)`` (so a hook that raises,
    Ctrl-C included, loses no step past the checkpoint it follows).
    """
    state = state or LoopState()
    start = time.perf_counter()
    with _progress(progress, steps, state.step) as advance:
        while state.step < steps:
            loss, seen = step(state.step)
            state.step += 1
            state.history.append(loss)
            state.seen += seen
            advance(loss, state.seen / (time.perf_counter() - start))
            every = checkpoint_every and state.step % checkpoint_every == 0
            if checkpoint is not None and every and state.step < steps:
                checkpoint(state)  # before the hook: a hook that stops the run keeps this step
            if on_step is not None:
                on_step(state.step, loss)
    state.seconds = time.perf_counter() - start
    return state


def minimise(loss: MicroLoss, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """``steps`` plain steps of ``loss`` (no accumulation, clipping or progress) — how the
    per-layer calibration problems of :mod:`splice.compress` are solved; returns the losses."""
    return fit(TrainStep(loss, optimizer), steps).history


@contextmanager
def distributed(device: str | torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """``(rank, world, device)`` of this process; under ``torchrun``/``accelerate launch``
    (``WORLD_SIZE`` > 1) it joins the process group (NCCL on CUDA, else Gloo, one GPU per
    local rank) and leaves it after the body, once every rank is done."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    yield rank, world, device
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextmanager
def _progress(show: bool, total: int, done: int) -> Iterator[Callable[[float, float], None]]:
    """Yield ``advance(loss, samples_per_s)``: a rich bar with loss and throughput when ``show``."""
    if not show:
        yield lambda loss, rate: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=total, completed=done, loss=float("nan"), rate=0.0)
        yield lambda loss, rate: progress.update(task, advance=1, loss=loss, rate=rate)
