"""``splice train``: fine-tune a local HF model with an adapter or in full, in plain PyTorch.

AdamW, linear warmup then linear decay, gradient clipping and accumulation, fp32 or bf16
autocast, periodic atomic checkpoints with exact resume, evaluation at the end. One process
on CPU by default; under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) the model is
wrapped in DDP, each rank reads its own slice of every global batch, and rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from splice.errors import SpliceError

from ._checkpoint import load_checkpoint, save_checkpoint
from ._data import Rows, load_splits

__all__ = ["TrainConfig", "train"]

# Attention projections per model family, as peft's defaults (used when --targets is omitted).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


WHOLE = ("full", "head")  # methods without an adapter: every weight trains, or only the new head


class TrainConfig(pydantic.BaseModel):
    """Everything one training run depends on; written to ``metrics.json``."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    model: Path = pydantic.Field(description="local Hugging Face model dir")
    data: str = pydantic.Field(description="CSV/JSONL file (text,label) or bench task name")
    out: Path = pydantic.Field(description="output dir: adapter or model, metrics.json")
    method: str = pydantic.Field(
        "lora", description="registered adapter method, 'full', or 'head' (linear probe)"
    )
    targets: list[str] | str | None = pydantic.Field(None, description="module suffixes or regex")
    layers: list[int] | None = pydantic.Field(None, description="layer indices to adapt")
    adapter: dict[str, Any] = pydantic.Field({}, description="method hyperparameters")
    objective: Literal["auto", "classification", "causal-lm"] = "auto"
    eval_data: str | None = pydantic.Field(None, description="separate eval file")
    eval_fraction: float = pydantic.Field(0.1, gt=0, lt=1, description="held out if no eval file")
    eval_split: Literal["test", "val"] = pydantic.Field(
        "test", description="bench task split to evaluate on (val: for choosing settings)"
    )
    max_length: int = pydantic.Field(128, gt=0, description="tokens per example")
    batch_size: int = pydantic.Field(16, gt=0, description="examples per micro-batch")
    grad_accum: int = pydantic.Field(1, gt=0, description="micro-batches per optimizer step")
    steps: int | None = pydantic.Field(None, gt=0, description="optimizer steps (else epochs)")
    epochs: float = pydantic.Field(1.0, gt=0, description="passes over the data if no steps")
    lr: float | None = pydantic.Field(None, gt=0, description="peak LR (5e-4 adapter, 5e-5 full)")
    head_lr: float | None = pydantic.Field(
        None, gt=0, description="peak LR of new modules, e.g. the head (default: lr)"
    )
    warmup: float = pydantic.Field(0.06, ge=0, lt=1, description="warmup fraction of steps")
    weight_decay: float = pydantic.Field(0.0, ge=0, description="AdamW decay on matrices")
    grad_clip: float = pydantic.Field(1.0, ge=0, description="max grad norm (0: off)")
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = pydantic.Field(0, ge=0, description="steps between checkpoints")
    resume: bool = pydantic.Field(False, description="continue from out/checkpoint")
    seed: int = 0
    device: str = "cpu"
    format: Literal["splice", "peft"] = pydantic.Field("splice", description="adapter format")
    progress: bool = True

    @pydantic.model_validator(mode="after")
    def _whole_model_methods_take_no_adapter_options(self) -> TrainConfig:
        if self.method in WHOLE and (self.adapter or self.targets or self.layers):
            raise ValueError(f"--method {self.method} takes no adapter options, targets or layers")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed."""
        return self.model_dump(mode="json", exclude={"resume", "progress", "device"})


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


def _adapt(cfg: TrainConfig, model: nn.Module, new_modules: list[str]) -> None:
    from splice.adapters import inject

    targets = cfg.targets or DEFAULT_TARGETS.get(model.config.model_type)
    if not targets:
        raise SpliceError(
            f"no default targets for model type {model.config.model_type!r}",
            fix="pass --targets (module name suffixes, e.g. q_proj,v_proj)",
        )
    inject(
        model, cfg.method, targets, layers=cfg.layers, modules_to_save=new_modules, **cfg.adapter
    )


class _Batches:
    """Deterministic micro-batches: epoch e visits a permutation seeded by (seed, e); rank r of
    w reads slice r of each global batch, so batch i is a pure function of i (exact resume)."""

    def __init__(self, encoded: list[list[int]], labels: list[int] | None, cfg: TrainConfig,
                 pad_id: int, rank: int = 0, world: int = 1) -> None:  # fmt: skip
        self.encoded, self.labels, self.pad_id = encoded, labels, pad_id
        self.bs, self.rank, self.world, self.seed = cfg.batch_size, rank, world, cfg.seed
        self.per_epoch = max(1, len(encoded) // (self.bs * world))

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(i, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.encoded), generator=g)
        start = (pos * self.world + self.rank) * self.bs
        return collate(
            perm[start : start + self.bs].tolist(), self.encoded, self.labels, self.pad_id
        )


def collate(idx: list[int], encoded: list[list[int]], labels: list[int] | None, pad_id: int):
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (-100 on causal-LM padding)."""
    width = max(len(encoded[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
        mask[row, : len(encoded[i])] = 1
    if labels is None:
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([labels[i] for i in idx]),
    }


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


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


def _in_new_module(name: str, new_modules: list[str]) -> bool:
    """Whether parameter ``name`` belongs to a module the checkpoint lacked (e.g. the head)."""
    return name.rsplit(".", 1)[0] in new_modules


def _param_groups(
    cfg: TrainConfig, named: dict[str, nn.Parameter], new_modules: list[str], full: bool
) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors do not; new modules (the head) train at
    ``head_lr``. Empty groups are dropped, so the layout depends only on the settings."""
    lr = cfg.lr or (5e-5 if full else 5e-4)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named.items():
        groups.setdefault((_in_new_module(name, new_modules), p.ndim >= 2), []).append(p)
    return [
        {
            "params": params,
            "lr": (cfg.head_lr or lr) if head else lr,
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
    from splice.adapters import aux_loss, save_adapter, trainable_parameters

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)

    train_rows, eval_rows = load_splits(
        cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.eval_split
    )
    import transformers

    objective = _objective(
        cfg, transformers.AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    )
    labels = _label_names(train_rows, eval_rows) if objective == "classification" else None
    tokenizer, model, new_modules = _load_model(cfg, objective, labels)
    full, adapted = cfg.method == "full", cfg.method not in WHOLE
    if cfg.method == "head":
        _freeze_all_but_the_head(model, new_modules, objective)
    elif adapted:
        _adapt(cfg, model, new_modules if objective == "classification" else [])
    model.to(device)

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
    batches = _Batches(train_ids, train_ys, cfg, tokenizer.pad_token_id, rank, world)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * batches.per_epoch / cfg.grad_accum))

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(_param_groups(cfg, named, new_modules, full))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total, round(cfg.warmup * total))
    )

    ckpt_dir = cfg.out / "checkpoint"
    step, history, resumed_from = 0, [], None
    if cfg.resume and (ckpt_dir / "state.json").is_file():
        info = load_checkpoint(ckpt_dir, named, optimizer, scheduler)
        if info["config"] != cfg.fingerprint():
            changed = sorted(k for k, v in cfg.fingerprint().items() if info["config"].get(k) != v)
            raise SpliceError(
                f"checkpoint was made with different settings: {changed}",
                where=str(ckpt_dir),
                fix="rerun with the original settings, or drop --resume to start over",
            )
        step, history, resumed_from = info["step"], info["history"], info["step"]

    core = model
    if world > 1:
        from splice.adapters import METHODS

        sparse = adapted and not METHODS.get(cfg.method).uses_all_parameters
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=sparse)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16")  # noqa: E731
    show = cfg.progress and rank == 0
    start, seen = time.perf_counter(), 0
    with _progress(show, total, step) as advance:
        while step < total:
            model.train()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in batches(step * cfg.grad_accum + micro).items()}
                sync = micro == cfg.grad_accum - 1 or world == 1
                with model.no_sync() if not sync else nullcontext(), autocast():
                    loss = model(**batch).loss
                    extra = aux_loss(core) if adapted else None
                    total_loss = loss if extra is None else loss + extra
                    (total_loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                seen += len(batch["input_ids"]) * world
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(named.values(), cfg.grad_clip)
            if world > 1:  # log the mean over ranks, not rank 0's slice
                mean = torch.tensor(step_loss, device=device)
                torch.distributed.all_reduce(mean)
                step_loss = mean.item() / world
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(step_loss)
            rate = seen / (time.perf_counter() - start)
            advance(step_loss, rate)
            if on_step is not None:
                on_step(step, step_loss)
            if (
                rank == 0
                and cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and step < total
            ):
                info = {"step": step, "history": history, "config": cfg.fingerprint()}
                save_checkpoint(ckpt_dir, named, optimizer, scheduler, info)
    wall = time.perf_counter() - start

    metrics: dict[str, Any] = {}
    if rank == 0:
        eval_ids, eval_ys = encode(eval_rows)
        chunks = [
            list(range(i, min(i + cfg.batch_size, len(eval_ids))))
            for i in range(0, len(eval_ids), cfg.batch_size)
        ]
        eval_batches = [
            {
                k: v.to(device)
                for k, v in collate(c, eval_ids, eval_ys, tokenizer.pad_token_id).items()
            }
            for c in chunks
        ]
        counts = trainable_parameters(core)
        head = sum(
            p.numel()
            for n, p in core.named_parameters()
            if p.requires_grad and _in_new_module(n, new_modules)
        )
        metrics = {
            "objective": objective,
            "method": cfg.method,
            "labels": labels,
            "steps": total,
            "train_examples": len(train_rows),
            "eval_examples": len(eval_rows),
            "train_loss": sum(history[-10:]) / len(history[-10:]),
            "loss_history": history,
            "eval": evaluate(core, eval_batches, objective, autocast),
            "trainable_parameters": counts.trainable,
            "adapter_parameters": counts.trainable - head if adapted else None,  # head excluded
            "total_parameters": counts.total,
            "samples_per_second": seen / wall if wall > 0 else None,
            "wall_seconds": wall,
            "resumed_from_step": resumed_from,
            "world_size": world,
            "config": cfg.model_dump(mode="json"),
        }
        _write_outputs(cfg, core, tokenizer, adapted, labels, metrics, save_adapter)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def _write_outputs(cfg, model, tokenizer, adapted, labels, metrics, save_adapter) -> None:
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


@contextmanager
def _progress(show: bool, total: int, done: int):
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
