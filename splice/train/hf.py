"""``splice train``: fine-tune a local HF model with an adapter or in full, in plain PyTorch.

This file builds the run — model and tokenizer, adapter or frozen backbone, deterministic
batches, AdamW groups, linear warmup then linear decay — and evaluates and writes it; the
steps (accumulation, clipping, bf16 autocast, checkpoints, DDP) are :func:`splice.train.fit`'s.
One process on CPU by default; under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1)
the model is wrapped in DDP, each rank reads its own slice of every global batch, and rank 0
writes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splice.errors import SpliceError
from splice.train.batches import Batches, collate
from splice.train.checkpoint import load_checkpoint, save_checkpoint
from splice.train.config import DEFAULT_HEAD_LR, DEFAULT_TARGETS, WHOLE, TrainConfig
from splice.train.data import Rows, load_splits
from splice.train.loop import LoopState, TrainStep, distributed, fit
from splice.train.schedule import linear_warmup_decay
from splice.train.tasks import combine, task_routing

__all__ = ["evaluate", "train"]

# Setup -----------------------------------------------------------------------------------------


def _objective(cfg: TrainConfig, model_config: Any) -> str:
    if cfg.objective != "auto":
        return cfg.objective
    archs = getattr(model_config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return "causal-lm" if causal else "classification"


def _label_names(train: Rows, evaluation: Rows) -> list[str]:
    if train.labels is None or evaluation.labels is None:
        raise SpliceError(
            "classification needs a 'label' column", fix="add labels or use causal-lm"
        )
    names = {str(x) for x in train.labels + evaluation.labels}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=int if numeric else str)


def _load_model(cfg: TrainConfig, objective: str, labels: list[str] | None):
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if objective == "classification":
        cls = transformers.AutoModelForSequenceClassification
        kwargs |= {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
        kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    else:
        cls = transformers.AutoModelForCausalLM
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()  # the new head is expected: its "newly initialized" report is noise
    log.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        model, info = cls.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as e:
        raise SpliceError(
            f"cannot load the model: {e}".split("\n")[0], where=str(cfg.model)
        ) from None
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})  # e.g. the head
    return tokenizer, model.float(), new_modules


def _guide(model: nn.Module) -> Any:
    from splice.adapters import guide

    return guide(model)


def _freeze_all_but_the_head(model: nn.Module, new_modules: list[str], objective: str) -> None:
    """Linear probe (``--method head``): the pretrained weights stay frozen, the new head trains."""
    if objective != "classification" or not new_modules:
        raise SpliceError(
            "--method head trains only a new classification head, and this run has none"
            + ("" if objective == "classification" else f" (objective {objective})"),
            fix="use a base model without a classification head, or an adapter method",
        )
    for name, p in model.named_parameters():
        p.requires_grad_(_in_new_module(name, new_modules))


def _adapt(cfg: TrainConfig, model: nn.Module, new_modules: list[str], total: int) -> None:
    from splice.adapters import for_run, inject

    targets = cfg.targets or DEFAULT_TARGETS.get(model.config.model_type)
    if not targets:
        raise SpliceError(
            f"no default targets for model type {model.config.model_type!r}",
            fix="pass --targets (module name suffixes, e.g. q_proj,v_proj)",
        )
    options = for_run(cfg.method, cfg.adapter, total)
    inject(model, cfg.method, targets, layers=cfg.layers, modules_to_save=new_modules, **options)
    if cfg.format == "peft":  # a method with no PEFT form fails now, not after training
        import tempfile
        from pathlib import Path

        from splice.adapters import save_adapter

        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(model, Path(tmp) / "check", "peft")


# Evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model, batches: list[dict[str, torch.Tensor]], objective: str, autocast
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (causal LM) over ``batches``."""
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for batch in batches:
        with autocast():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        logits = logits.float()
        if objective == "classification":
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(batch["labels"])
        else:
            target = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(
                logits[:, :-1].transpose(1, 2), target, reduction="sum"
            ).item()
            count += (target != -100).sum().item()
    loss = loss_sum / max(count, 1)
    if objective == "classification":
        return {"loss": loss, "accuracy": correct / max(count, 1), "examples": count}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


STALLED = {"classification": 0.2, "causal-lm": 0.02}  # least share of the loss a run removes


def _stalled(history: list[float], objective: str) -> str | None:
    """A warning when the train loss fell by less than ``STALLED[objective]`` of its start
    (means of the first and last ≤ 10 steps), e.g. a head that did not learn; else None."""
    w = max(1, min(10, len(history) // 5))
    start, end = sum(history[:w]) / w, sum(history[-w:]) / w
    if start <= 0 or (start - end) / start >= STALLED[objective]:
        return None
    return (
        f"the training loss barely moved ({start:.4g} → {end:.4g}, "
        f"{(end - start) / start:+.0%}): the model may have learnt little; try a higher "
        "--lr or --head-lr, or more --steps"
    )


def _in_new_module(name: str, new_modules: list[str]) -> bool:
    """Whether parameter ``name`` belongs to a module the checkpoint lacked (e.g. the head)."""
    return name.rsplit(".", 1)[0] in new_modules


def _param_groups(
    cfg: TrainConfig, named: dict[str, nn.Parameter], new_modules: list[str], full: bool
) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors do not; new modules (the head) train at
    ``head_lr``. Empty groups are dropped, so the layout depends only on the settings."""
    lr = cfg.lr or (5e-5 if full else 5e-4)
    head_lr = cfg.head_lr or (cfg.lr if cfg.method == "head" and cfg.lr else DEFAULT_HEAD_LR)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named.items():
        groups.setdefault((_in_new_module(name, new_modules), p.ndim >= 2), []).append(p)
    return [
        {
            "params": params,
            "lr": head_lr if head else lr,
            "weight_decay": cfg.weight_decay if matrix else 0.0,
        }
        for (head, matrix), params in sorted(groups.items())
    ]


# The loop --------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data``; writes the adapter (or model) and metrics.json.

    ``on_step(step, loss)`` is called after every optimizer step (progress hooks, tests).

    Returns:
        The metrics written to ``out/metrics.json``.

    Raises:
        SpliceError: unreadable model or data, unknown method/targets, incompatible checkpoint.
    """
    with distributed(cfg.device) as (rank, world, device):
        return _run(cfg, rank, world, device, on_step)


def _run(
    cfg: TrainConfig,
    rank: int,
    world: int,
    device: torch.device,
    on_step: Callable[[int, float], None] | None,
) -> dict[str, Any]:
    """The body of :func:`train` in one process (rank 0 evaluates, writes and reports)."""
    from splice.adapters import trainable_parameters

    torch.manual_seed(cfg.seed)
    train_rows, eval_rows = load_splits(
        cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.eval_split
    )
    import transformers

    from splice.convert import register

    register()  # converted recursive models (splice convert) load without remote code
    objective = _objective(
        cfg, transformers.AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    )
    labels = _label_names(train_rows, eval_rows) if objective == "classification" else None
    tokenizer, model, new_modules = _load_model(cfg, objective, labels)
    full, adapted = cfg.method == "full", cfg.method not in WHOLE
    tasks = task_routing(cfg, train_rows, eval_rows, world)
    route = tasks.route if tasks else None

    def encode(rows: Rows) -> tuple[list[list[int]], list[int] | None]:
        ids = tokenizer(rows.texts, truncation=True, max_length=cfg.max_length)["input_ids"]
        ys = None if labels is None else [labels.index(str(y)) for y in rows.labels]
        return ids, ys

    train_ids, train_ys = encode(train_rows)
    if world > 1 and len(train_ids) < cfg.batch_size * world:
        raise SpliceError(
            f"{len(train_ids)} training examples fill no global batch of {world}×{cfg.batch_size}",
            fix="lower --batch-size",
        )
    batches = Batches(
        train_ids, train_ys, cfg.batch_size, cfg.seed, tokenizer.pad_token_id, rank, world,
        tasks=tasks.ids(train_rows) if route else None,
    )  # fmt: skip
    total = cfg.steps or max(1, math.ceil(cfg.epochs * batches.per_epoch / cfg.grad_accum))
    if cfg.method == "head":
        _freeze_all_but_the_head(model, new_modules, objective)
    elif adapted and not cfg.select:  # after the batches: schedules (AdaLoRA) need the length
        _adapt(cfg, model, new_modules if objective == "classification" else [], total)
    model.to(device)
    selection = None
    if cfg.select:  # where to tune (splice.select): injects, or wraps the optimizer (ID³)
        from splice.train.select import select

        saved = new_modules if objective == "classification" else []
        targets = DEFAULT_TARGETS.get(model.config.model_type)
        selection = select(cfg, model, batches, device, saved, targets, total)
        adapted = selection.adapted

    if cfg.base_bits is not None:  # QLoRA: adapters over a quantized frozen base
        from splice.compress import quantize_base

        quantize_base(model, cfg.base_bits)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(_param_groups(cfg, named, new_modules, full))
    if selection is not None:
        optimizer = selection.wrap(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(total, round(cfg.warmup * total))
    )

    ckpt_dir = cfg.out / "checkpoint"
    state, resumed_from = LoopState(), None
    if cfg.resume and (ckpt_dir / "state.json").is_file():
        info = load_checkpoint(ckpt_dir, named, optimizer, scheduler)
        if info["config"] != cfg.fingerprint():
            changed = sorted(k for k, v in cfg.fingerprint().items() if info["config"].get(k) != v)
            raise SpliceError(
                f"checkpoint was made with different settings: {changed}",
                where=str(ckpt_dir),
                fix="rerun with the original settings, or drop --resume to start over",
            )
        state, resumed_from = LoopState(info["step"], info["history"]), info["step"]

    core = model
    if world > 1:
        from splice.adapters import METHODS

        sparse = adapted and not METHODS.get(cfg.method).uses_all_parameters
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=sparse)

    gdr = _guide(core) if adapted else None  # R-AMT: a teacher forward, a second backward

    def micro_loss(i: int) -> tuple[torch.Tensor, int]:
        task, batch = batches(i)
        if route is not None:
            route(core, task)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        if gdr is not None:
            with gdr.teacher():
                teacher = model(**batch).logits
            gdr(out.logits, teacher)
        return out.loss, len(batch["input_ids"])

    def save(state: LoopState) -> None:
        info = {"step": state.step, "history": state.history, "config": cfg.fingerprint()}
        save_checkpoint(ckpt_dir, named, optimizer, scheduler, info)

    step = TrainStep(
        micro_loss, optimizer, scheduler, list(named.values()), cfg.grad_accum, cfg.grad_clip,
        aux=core if adapted else None, precision=cfg.precision, device=device,
        ddp=model if world > 1 else None,
    )  # fmt: skip
    model.train()
    state = fit(
        step, total, state=state, on_step=on_step, checkpoint=save if rank == 0 else None,
        checkpoint_every=cfg.checkpoint_every, progress=cfg.progress and rank == 0,
    )  # fmt: skip
    if rank != 0:
        return {}
    if selection is not None:
        selection.finish(core)
        adapted = True
    eval_ids, eval_ys = encode(eval_rows)

    def evaluate_rows(rows: list[int], task: int | None = None) -> dict[str, float]:
        if route is not None:
            route(core, task)
        chunks = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        pad = tokenizer.pad_token_id
        batches = [
            {k: v.to(device) for k, v in collate(c, eval_ids, eval_ys, pad).items()} for c in chunks
        ]
        return evaluate(core, batches, objective, step.autocast)

    if tasks is None:
        by_task, overall = None, evaluate_rows(list(range(len(eval_ids))))
    else:
        groups = tasks.groups(eval_rows)
        by_task = {t: evaluate_rows(rows, tasks.names.index(t)) for t, rows in groups.items()}
        overall = combine(list(by_task.values()), objective)
    counts = trainable_parameters(core)
    head = sum(
        p.numel()
        for n, p in core.named_parameters()
        if p.requires_grad and _in_new_module(n, new_modules)
    )
    history, wall = state.history, state.seconds
    metrics = {
        "objective": objective,
        "method": cfg.method,
        "labels": labels,
        "steps": total,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "train_loss": sum(history[-10:]) / len(history[-10:]),
        "loss_history": history,
        "warnings": [w for w in [_stalled(history, objective)] if w],
        "eval": overall,
        "tasks": tasks.names if tasks else None,
        "eval_by_task": by_task,
        "trainable_parameters": counts.trainable,
        "adapter_parameters": counts.trainable - head if adapted else None,  # head excluded
        "total_parameters": counts.total,
        "samples_per_second": state.seen / wall if wall > 0 else None,
        "wall_seconds": wall,
        "resumed_from_step": resumed_from,
        "world_size": world,
        "config": cfg.model_dump(mode="json"),
        "selection": selection.info if selection else None,
    }
    _write_outputs(cfg, core, tokenizer, adapted, labels, metrics)
    return metrics


def _write_outputs(cfg, model, tokenizer, adapted, labels, metrics) -> None:
    from splice.adapters import save_adapter
    from splice.io.atomic import atomic_dir

    if not adapted:  # full fine-tune or linear probe: the whole model, its new head included
        with atomic_dir(cfg.out / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    else:
        kwargs = {"num_labels": len(labels)} if labels else {}
        save_adapter(
            model, cfg.out / "adapter", cfg.format, base_model=cfg.model, model_kwargs=kwargs
        )
    tmp_metrics = cfg.out / ".metrics.json.tmp"
    tmp_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp_metrics.replace(cfg.out / "metrics.json")
    shutil.rmtree(cfg.out / "checkpoint", ignore_errors=True)
