"""Fine-tune one task: an adapter (LoRA by default) or all weights, plus a linear head.

The steps are :func:`splice.train.fit`'s; this file builds the run (encoder copy, adapter, head,
AdamW, seeded batch order) and caches its result: the task's deltas (keyed by the base
model's tensor names) and its head. Runs are cached under ``<cache>/bench/runs`` keyed by a
hash of (model, task splits, fine-tuning config, seed) and written atomically, so re-runs skip
training and Ctrl-C never leaves a partial entry.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from splice._schema import Strict
from splice.data.cache import cache_root, stable_hash
from splice.data.encoders import Encoder
from splice.data.registry import TaskData
from splice.deltas import Delta, Dense, load_deltas, save_deltas
from splice.io.atomic import atomic_dir
from splice.train.loop import LoopState, TrainStep, fit

__all__ = [
    "FinetuneConfig",
    "Head",
    "TaskRun",
    "Trained",
    "apply_deltas",
    "batch_stream",
    "finetune",
    "finetune_cached",
    "is_cached",
    "train",
]


class FinetuneConfig(Strict):
    """How each task is fine-tuned. Part of the cache key."""

    finetune: str = Field("lora", description="'full', or a registered adapter name (e.g. lora)")
    r: int = Field(8, description="adapter rank")
    alpha: float = Field(16.0, description="adapter scaling numerator (scale = alpha / r)")
    targets: tuple[str, ...] | None = Field(None, description="adapter targets; None = encoder's")
    steps: int = Field(100, description="optimizer steps per task")
    batch_size: int = 32
    lr: float | None = Field(
        None, description="AdamW learning rate of the tuned weights; None: 1e-3, full FT 5e-5"
    )
    head_lr: float = Field(1e-2, description="AdamW learning rate of the linear head")

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-5 if self.finetune == "full" else 1e-3


@dataclass(frozen=True)
class Head:
    """A task's linear classifier on pooled features."""

    weight: Tensor  # (classes, dim)
    bias: Tensor  # (classes,)

    def __call__(self, features: Tensor) -> Tensor:
        return features @ self.weight.T.to(features.device) + self.bias.to(features.device)


@dataclass(frozen=True)
class TaskRun:
    task: str
    deltas: dict[str, Delta]
    head: Head
    meta: dict[str, Any] = field(default_factory=dict)


def _trainable(
    model: nn.Module,
    cfg: FinetuneConfig,
    targets: tuple[str, ...],
    options: Mapping[str, Any] | None = None,
) -> list[nn.Parameter]:
    """Unfreeze (full) or inject the adapter; ``options`` replace ``cfg``'s r and alpha."""
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return [p for p in model.parameters() if p.is_floating_point()]
    from splice import adapters

    if options is None:
        fields = adapters.METHODS.get(cfg.finetune).Config.model_fields
        options = {k: v for k, v in (("r", cfg.r), ("alpha", cfg.alpha)) if k in fields}
    options = adapters.for_run(cfg.finetune, dict(options), cfg.steps)
    adapters.inject(model, cfg.finetune, targets=list(targets), **options)
    return [p for p in model.parameters() if p.requires_grad]


def _guide(model: nn.Module) -> Any:
    from splice import adapters

    return adapters.guide(model)


def _deltas(model: nn.Module, base: nn.Module, cfg: FinetuneConfig) -> dict[str, Delta]:
    if cfg.finetune == "full":
        ref = base.state_dict()
        return {
            n: Dense((p.detach() - ref[n]).cpu())
            for n, p in model.named_parameters()
            if p.is_floating_point()
        }
    from splice import adapters

    return dict(adapters.adapter_deltas(model))


@dataclass
class Trained:
    """A fine-tuned copy of the encoder's module, its head and the loop's final state."""

    model: nn.Module
    head: nn.Linear
    state: LoopState
    params: list[nn.Parameter]
    selection: dict[str, Any] | None = None  # a selector row's choice (peft_select)


def batch_stream(n: int, batch_size: int, seed: int) -> Callable[[], np.ndarray]:
    """``next_batch()``: the next ``batch_size`` indices of a stream of seeded permutations."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)

    def next_batch() -> np.ndarray:
        nonlocal order
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        return idx

    return next_batch


def train(
    encoder: Encoder,
    data: TaskData,
    cfg: FinetuneConfig,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    options: Mapping[str, Any] | None = None,
    select: Mapping[str, Any] | None = None,
    prepared: Any | None = None,
) -> Trained:
    """Train ``cfg.steps`` AdamW steps on shuffled train batches; the backbone stays in eval
    mode (no dropout, frozen BatchNorm statistics). ``options``: the adapter's (default:
    ``cfg``'s r and alpha where the method has them). ``select``: a selector row's settings
    (:mod:`splice.bench.peft_select`) that decide what trains instead of ``cfg.finetune``.
    ``prepared``: ``encoder.prepare(data.train.x)`` when the caller keeps it across runs."""
    device = next(encoder.module.parameters()).device
    torch.manual_seed(seed)
    model = copy.deepcopy(encoder.module)
    model.requires_grad_(False)
    targets = cfg.targets or encoder.default_targets
    prepared = encoder.prepare(data.train.x) if prepared is None else prepared
    labels = torch.as_tensor(data.train.y, device=device)
    chosen = None
    if select is None:
        params = _trainable(model, cfg, targets, options)
        model.eval()
        head = nn.Linear(encoder.dim, len(data.classes)).to(device)
    else:  # the head first: SPT's sensitivity pass runs the loss through it
        from splice.bench.peft_select import prepare

        model.eval()
        head = nn.Linear(encoder.dim, len(data.classes)).to(device)
        calib = batch_stream(len(prepared), cfg.batch_size, seed)  # as the training stream

        def calib_batch() -> tuple[Any, Tensor]:
            idx = calib()
            return prepared.batch(idx, device), labels[torch.as_tensor(idx, device=device)]

        chosen = prepare(select, model, head, encoder, calib_batch, targets, cfg.steps)
        params = chosen.params
    opt: torch.optim.Optimizer = torch.optim.AdamW(
        [
            {"params": params, "lr": cfg.effective_lr},
            {"params": head.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=0.0,
    )
    if chosen is not None:
        opt = chosen.wrap(opt)
    next_batch = batch_stream(len(prepared), cfg.batch_size, seed)

    adapted = cfg.finetune != "full" and chosen is None  # selectors: no aux loss, no guide
    gdr = _guide(model) if adapted else None  # R-AMT's teacher-gated gradient

    def micro_loss(i: int) -> tuple[Tensor, int]:
        idx = next_batch()
        batch = prepared.batch(idx, device)
        logits = head(encoder.features(batch, module=model))
        if gdr is not None:
            with gdr.teacher():
                teacher = head(encoder.features(batch, module=model))
            gdr(logits, teacher)
        loss = nn.functional.cross_entropy(logits, labels[torch.as_tensor(idx, device=device)])
        return loss, len(idx)

    # aux: the method's auxiliary loss is minimised (not logged) and its after_step runs
    # (AdaLoRA's rank allocation), as in splice train
    step = TrainStep(micro_loss, opt, device=device, aux=model if adapted else None)
    state = fit(step, cfg.steps, on_step=on_step)
    if chosen is not None:  # ID³ exports its entries as an adapter here
        params = chosen.finish()
    return Trained(model, head, state, params, chosen.info if chosen is not None else None)


def finetune(
    encoder: Encoder,
    data: TaskData,
    cfg: FinetuneConfig,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> TaskRun:
    """:func:`train`, then the task's deltas and head."""
    done = train(encoder, data, cfg, seed, on_step)
    state, head = done.state, done.head
    final = state.history[-1] if state.history else float("nan")
    meta = {"train_s": round(state.seconds, 2), "final_loss": final}
    h = Head(head.weight.detach().cpu().clone(), head.bias.detach().cpu().clone())
    return TaskRun(data.name, _deltas(done.model, encoder.module, cfg), h, meta)


def run_key(encoder: Encoder, data: TaskData, cfg: FinetuneConfig, seed: int) -> str:
    """Cache key: (model, task splits, fine-tuning config, seed)."""
    return stable_hash(
        {"model": encoder.key, "data": data.key, "cfg": cfg.model_dump(), "seed": seed}
    )


def _entry(encoder: Encoder, data: TaskData, cfg: FinetuneConfig, seed: int) -> Path:
    return cache_root() / "bench" / "runs" / f"{data.name}-{run_key(encoder, data, cfg, seed)}"


def is_cached(encoder: Encoder, data: TaskData, cfg: FinetuneConfig, seed: int) -> bool:
    """Whether the cache holds this run (an entry that turns out damaged is retrained)."""
    return (_entry(encoder, data, cfg, seed) / "meta.json").is_file()


def _load(path: Path, task: str) -> TaskRun:
    head = load_file(str(path / "head.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    deltas = load_deltas(path / "deltas.safetensors")
    return TaskRun(task, dict(deltas), Head(head["weight"], head["bias"]), meta)


def finetune_cached(
    encoder: Encoder,
    data: TaskData,
    cfg: FinetuneConfig,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[TaskRun, bool]:
    """Load the task's run from the cache, or train and store it. Returns (run, was_cached)."""
    path = _entry(encoder, data, cfg, seed)
    if is_cached(encoder, data, cfg, seed):
        try:
            return _load(path, data.name), True
        except Exception:  # a damaged entry is retrained and replaced
            pass
    run = finetune(encoder, data, cfg, seed, on_step)
    with atomic_dir(path) as tmp:
        save_deltas(run.deltas, tmp / "deltas.safetensors")
        save_file(
            {"weight": run.head.weight.contiguous(), "bias": run.head.bias.contiguous()},
            str(tmp / "head.safetensors"),
        )
        meta = {**run.meta, "task": data.name, "seed": seed, "cfg": cfg.model_dump()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return run, False


def apply_deltas(base: Mapping[str, Tensor], deltas: Mapping[str, Delta]) -> dict[str, Tensor]:
    """``base[name] + ΔW`` for every delta name: the fine-tuned tensors of one task."""
    return {n: base[n] + d.materialize(base[n].dtype).to(base[n].device) for n, d in deltas.items()}
