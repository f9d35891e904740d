"""Continual training: one backbone learns a sequence of tasks with a :mod:`splice.continual`
method; every optimizer step is :func:`splice.train.fit`'s.

Per task: a new linear head on the encoder's pooled features, the method's phases (each an
AdamW over its parameters and the head, ``steps × fraction`` steps of cross-entropy plus the
phase's penalty), the method's ``end_task``, then every task seen so far is evaluated with
its own head: row ``i`` of the accuracy matrix ``R``. After each task the run's state (the
method's tensors, the heads, ``R``) is written atomically under ``OUT/state`` and the record
to ``OUT/continual.json``, so a crash in task 4 keeps tasks 1–3 and ``resume`` goes on from
there. ``splice continual`` and ``splice bench --track continual`` both run through here.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
from torch import Tensor, nn

from splice._schema import Strict, validate
from splice.errors import SpliceError
from splice.train.loop import TrainStep, fit

__all__ = ["ContinualConfig", "ContinualRun", "accuracy", "run_sequence"]


class ContinualConfig(Strict):
    """One continual run's settings (a resumed run must match them)."""

    method: str = pydantic.Field(description="share, igsp, sequential_lora or lora_per_task")
    options: dict[str, Any] = pydantic.Field({}, description="the method's hyperparameters")
    targets: list[str] | None = pydantic.Field(None, description="None: the encoder's default")
    steps: int = pydantic.Field(100, gt=0, description="optimizer steps per task")
    batch_size: int = pydantic.Field(32, gt=0)
    lr: float | None = pydantic.Field(None, gt=0, description="None: the method's default")
    head_lr: float = pydantic.Field(1e-2, gt=0, description="LR of each task's linear head")
    seed: int = 0
    eval_split: Literal["test", "val"] = "test"


@dataclass
class ContinualRun:
    """A finished (or resumed-and-finished) sequence."""

    tasks: list[str]
    R: list[list[float | None]]
    stored: dict[str, Any]
    method: Any  # the ContinualMethod, adapters attached to ``model``
    model: nn.Module
    heads: dict[str, nn.Linear]
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)


@torch.inference_mode()
def accuracy(
    encoder: Any,
    data: Any,
    labels: np.ndarray,
    head: Callable[[Tensor], Tensor],
    *,
    module: nn.Module | None = None,
    weights: Mapping[str, Tensor] | None = None,
    batch_size: int = 128,
) -> float:
    """Share of ``data`` (a prepared split) whose argmax of ``head(features)`` is its label."""
    device = next(encoder.module.parameters()).device
    order = data.eval_order()
    correct = 0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        feats = encoder.features(data.batch(idx, device), weights, module=module)
        pred = head(feats.float()).argmax(-1).cpu().numpy()
        correct += int((pred == labels[idx]).sum())
    return correct / max(1, len(order))


def _check_tasks(tasks: Sequence[Any]) -> None:
    names = [t.name for t in tasks]
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise SpliceError(
            f"task sequence repeats task {sorted(seen)[0]!r}",
            fix="give each task of a continual sequence once (rename files to tell them apart)",
        )
    if not tasks:
        raise SpliceError("empty task sequence", fix="pass at least one task")


def _method(cfg: ContinualConfig) -> Any:
    from splice.continual import CONTINUAL

    cls = CONTINUAL.get(cfg.method)
    options = validate(
        cls.Config,
        cfg.options,
        prefix=f"{cfg.method}: ",
        fix=f"valid options: {sorted(cls.Config.model_fields)}",
    )
    return cls(options)


def _fingerprint(cfg: ContinualConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _load(state_dir: Path, cfg: ContinualConfig, tasks: Sequence[Any]) -> dict[str, Any] | None:
    """The saved progress of a run in ``state_dir`` after checking it fits ``cfg``/``tasks``."""
    info_path = state_dir / "progress.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    where = str(state_dir)
    if info["config"]["method"] != cfg.method:
        raise SpliceError(
            f"cannot resume with method {cfg.method!r}: this run used {info['config']['method']!r}",
            where=where,
            fix=f"rerun with --method {info['config']['method']}, or use a new --out",
        )
    changed = sorted(k for k, v in _fingerprint(cfg).items() if info["config"].get(k) != v)
    if changed:
        raise SpliceError(
            f"cannot resume: settings differ from the saved run: {changed}",
            where=where,
            fix="rerun with the original settings, or use a new --out",
        )
    done = info["tasks"]
    names = [t.name for t in tasks]
    if names[: len(done)] != done:
        raise SpliceError(
            f"cannot resume: the saved run's tasks {done} do not start the sequence {names}",
            where=where,
            fix="keep the finished tasks first and in order",
        )
    for t, classes in zip(tasks, info["classes"], strict=False):
        if len(t.classes) != classes:
            raise SpliceError(
                f"task {t.name!r} has {len(t.classes)} labels but its trained head has {classes}",
                where=where,
                fix="restore the task's original data, or start a new --out",
            )
    return info


def _save(state_dir: Path, method: Any, heads: dict[str, nn.Linear], info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from splice.io.atomic import atomic_dir

    with atomic_dir(state_dir) as tmp:
        save_file(method.state(), str(tmp / "method.safetensors"))
        flat = {
            f"head.{i}.{k}": v.detach().cpu().contiguous()
            for i, h in enumerate(heads.values())
            for k, v in h.state_dict().items()
        }
        save_file(flat, str(tmp / "heads.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(info, indent=2) + "\n")


def run_sequence(
    encoder: Any,
    tasks: Sequence[Any],
    cfg: ContinualConfig,
    out: Path | None = None,
    *,
    resume: bool = False,
    reference: Sequence[float] | None = None,
    on_task: Callable[[int, str, list[float | None], float], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    seed_from: Mapping[str, Mapping[str, Any]] | None = None,
) -> ContinualRun:
    """Train ``tasks`` (:class:`splice.data.registry.TaskData`) in order on a copy of
    ``encoder.module`` with ``cfg.method``; returns the accuracy matrix and the method.

    ``out`` (optional) receives ``state/`` after every task and ``continual.json`` (the
    record of :func:`splice.continual.metrics.save_matrix`); with ``resume`` an existing
    ``state/`` is continued. ``reference`` (per-task accuracy of independent training) gives
    the forward transfer. ``on_task(i, name, R[i], seconds)`` runs after each task.
    ``seed_from`` (``{source: {tensor name: LowRank}}``) initialises Share's subspace.

    Raises:
        SpliceError: a repeated task name, an unknown method or option, or a saved run that
            does not fit (another method, other settings or tasks, a task's label count
            differing from its trained head).
    """
    from safetensors.torch import load_file

    from splice.continual.metrics import save_matrix

    _check_tasks(tasks)
    method = _method(cfg)
    device = next(encoder.module.parameters()).device
    model = copy.deepcopy(encoder.module).eval()
    method.attach(model, cfg.targets or list(encoder.default_targets))
    if seed_from:
        if not hasattr(method, "seed"):
            raise SpliceError(f"{cfg.method} takes no initial adapters", fix="drop --init")
        method.seed(seed_from)
    lr = cfg.lr or method.default_lr
    heads: dict[str, nn.Linear] = {}
    R: list[list[float | None]] = []
    seconds: dict[str, float] = {}
    state_dir = None if out is None else Path(out) / "state"
    info = _load(state_dir, cfg, tasks) if resume and state_dir is not None else None
    if info is not None:
        done = info["tasks"]
        method.load_state(load_file(str(state_dir / "method.safetensors")), done)
        saved = load_file(str(state_dir / "heads.safetensors"))
        for i, name in enumerate(done):
            head = nn.Linear(encoder.dim, info["classes"][i]).to(device)
            head.load_state_dict({k: saved[f"head.{i}.{k}"] for k in ("weight", "bias")})
            heads[name] = head
        R = [row + [None] * (len(tasks) - len(row)) for row in info["R"]]
        seconds = dict(info["seconds"])
    resumed = list(heads)
    evals = {}
    for t in tasks:
        split = getattr(t, cfg.eval_split)
        evals[t.name] = (encoder.prepare(split.x), np.asarray(split.y))
    for i in range(len(resumed), len(tasks)):
        task = tasks[i]
        start = time.perf_counter()
        torch.manual_seed(cfg.seed + i)
        phases = method.start_task(task.name)
        head = nn.Linear(encoder.dim, len(task.classes)).to(device)
        _train_task(encoder, model, method, head, task, phases, cfg, lr, i, device, on_step)
        method.end_task(task.name)
        heads[task.name] = head
        method.train_mode(False)
        row: list[float | None] = [None] * len(tasks)
        for j in range(i + 1):
            name = tasks[j].name
            method.use_task(name)
            data, labels = evals[name]
            row[j] = accuracy(encoder, data, labels, heads[name], module=model)
        R.append(row)
        seconds[task.name] = round(time.perf_counter() - start, 2)
        progress = {
            "config": _fingerprint(cfg),
            "tasks": [t.name for t in tasks[: i + 1]],
            "classes": [len(t.classes) for t in tasks[: i + 1]],
            "R": [r[: i + 1] for r in R],
            "seconds": seconds,
        }
        if state_dir is not None:
            _save(state_dir, method, heads, progress)
            _record(out, tasks[: i + 1], R, cfg, method, heads, reference, seconds, save_matrix)
        if on_task is not None:
            on_task(i, task.name, row, seconds[task.name])
    if out is not None:
        _record(out, tasks, R, cfg, method, heads, reference, seconds, save_matrix)
    stored = _stored(method, heads)
    return ContinualRun([t.name for t in tasks], R, stored, method, model, heads, seconds, resumed)


def _stored(method: Any, heads: Mapping[str, nn.Linear]) -> dict[str, Any]:
    s = method.stored()
    head_params = sum(p.numel() for h in heads.values() for p in h.parameters())
    return {"params": s.params, "bytes": s.bytes, "heads_params": head_params, **s.detail}


def _record(out, tasks, R, cfg, method, heads, reference, seconds, save) -> None:
    n = len(tasks)
    save(
        Path(out) / "continual.json",
        [t.name for t in tasks],
        [r[:n] for r in R[:n]],
        method=cfg.method,
        stored=_stored(method, heads),
        reference=None if reference is None else list(reference)[:n],
        extra={"config": _fingerprint(cfg), "seconds": seconds, "info": method.info()},
    )


def _train_task(encoder, model, method, head, task, phases, cfg, lr, index, device, on_step):
    """Every phase of one task through :func:`fit`, on one seeded stream of batches."""
    prepared = encoder.prepare(task.train.x)
    labels = torch.as_tensor(task.train.y, device=device)
    rng = np.random.default_rng(cfg.seed + index)
    order = np.empty(0, dtype=np.int64)
    done = 0
    for k, phase in enumerate(phases):
        last = k == len(phases) - 1
        steps = cfg.steps - done if last else round(cfg.steps * phase.fraction)
        done += steps
        opt = torch.optim.AdamW(
            [{"params": phase.params, "lr": lr}, {"params": head.parameters(), "lr": cfg.head_lr}],
            weight_decay=0.0,
        )
        method.train_mode(True)

        def micro_loss(_: int, penalty=phase.penalty) -> tuple[Tensor, int]:
            nonlocal order
            if len(order) < cfg.batch_size:
                order = np.concatenate([order, rng.permutation(len(prepared))])
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            feats = encoder.features(prepared.batch(idx, device), module=model)
            loss = nn.functional.cross_entropy(head(feats), labels[torch.as_tensor(idx)])
            extra = penalty() if penalty is not None else None
            return (loss if extra is None else loss + extra), len(idx)

        if steps > 0:
            fit(TrainStep(micro_loss, opt, device=device), steps, on_step=on_step)
        if phase.after is not None:
            phase.after()


def load_sequence(
    model: str, tasks: Sequence[str], *, max_len: int = 64, image_size: int = 32, device="cpu"
) -> tuple[Any, list[Any]]:
    """The encoder and the task splits of a command-line sequence: ``model`` is a local
    BERT-style dir or ``minilm`` (text), ignored for image tasks (EfficientNet-Lite0)."""
    from splice.data.encoders import load_encoder
    from splice.data.local import resolve_task
    from splice.data.registry import Caps, load_task

    resolved = [resolve_task(t) for t in tasks]
    kinds = {t.modality for t in resolved}
    if len(kinds) > 1:
        raise SpliceError(
            f"a continual sequence takes one modality, got {sorted(kinds)}",
            fix="run text and image tasks as separate sequences",
        )
    _check_tasks(resolved)
    encoder = load_encoder(
        kinds.pop(), text_model=model, max_len=max_len, image_size=image_size, device=device
    )
    return encoder, [load_task(t, Caps()) for t in resolved]


def seed_deltas(encoder: Any, paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """LoRA deltas of adapter dirs/files keyed by ``encoder.module``'s tensor names (a
    task-head wrapper prefix such as ``bert.`` mapped away), for :meth:`Share.seed`."""
    from splice.deltas import LowRank, load_deltas
    from splice.deltas.wrapper import wrapper_map

    base = set(encoder.module.state_dict())
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        low = {n: d for n, d in load_deltas(p).items() if isinstance(d, LowRank)}
        m = wrapper_map(list(low), base)
        out[str(p)] = {(m(n) if m else n): d for n, d in low.items()}
    return out
