"""LoRA fine-tuning of a causal LM on one generation task, cached with a manifest.

The steps are :func:`splice.train.fit`'s (AdamW on the adapter only, seeded batch order from
:func:`splice.bench.finetune.batch_stream`). The loss is the causal-LM cross-entropy on the
answer tokens only (the end token included); the prompt is context. The instruction prefix
that every prompt shares runs once per batch and its keys/values are repeated for the rows
(:func:`splice.bench.llm_eval.prompt_pass`; gradients flow through it), and the 49k-way output
head is applied at the answer positions only.

Runs are cached under ``<cache>/bench/llm/<task>-<key>`` (key: model, task splits, config,
seed): ``deltas.safetensors`` (the LoRA's ΔW as :class:`~splice.deltas.LowRank`, keyed by the
base tensor names) and ``manifest.json`` (the file's sha256, the run's metadata). An entry
whose file does not match its manifest is retrained and replaced; entries are written
atomically.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from splice._schema import Strict
from splice.bench.finetune import batch_stream
from splice.bench.llm_eval import Encoded, prompt_pass
from splice.data.cache import cache_root, file_sha256, stable_hash
from splice.deltas import Delta, load_deltas, save_deltas
from splice.io.atomic import atomic_dir
from splice.train.loop import TrainStep, fit

__all__ = [
    "LMTrainConfig",
    "answer_loss",
    "finetune_lm",
    "finetune_lm_cached",
    "lm_entry",
    "load_entry",
    "train_lm",
]


class LMTrainConfig(Strict):
    """How each generation task is fine-tuned. Part of the cache key."""

    finetune: str = Field("lora", description="a registered adapter name")
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = Field(("q_proj", "v_proj"), description="adapter targets")
    steps: int = 30
    batch_size: int = 8
    lr: float = 2e-3


def answer_loss(
    model: nn.Module, enc: Encoded, idx: Sequence[int], pad: int
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of the answer tokens of examples ``idx`` given their prompts, and the
    number of answer tokens."""
    answers = [enc.answers[i] for i in idx]
    rest = [[*enc.prompts[i], *a[:-1]] for i, a in zip(idx, answers, strict=True)]
    out, *_ = prompt_pass(model.get_decoder(), enc.prefix, rest, pad)
    width = max(len(a) for a in answers)
    hidden = out.last_hidden_state[:, -width:]  # rows are left padded: answers end together
    target = torch.full((len(idx), width), -100, dtype=torch.long, device=hidden.device)
    for r, a in enumerate(answers):
        target[r, width - len(a) :] = torch.as_tensor(a)
    keep = target >= 0
    logits = model.get_output_embeddings()(hidden[keep])
    loss = nn.functional.cross_entropy(logits.float(), target[keep])
    return loss, int(keep.sum())


def train_lm(
    model: nn.Module,
    enc: Encoded,
    cfg: LMTrainConfig,
    seed: int,
    pad: int,
    on_step: Callable[[int, float], None] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, list[nn.Parameter], Any]:
    """Train ``cfg.finetune`` (an adapter method, or ``"full"``) on a copy of ``model`` with the
    answer-token loss; returns the copy, its trainable parameters and the loop's state.
    ``options``: the adapter's (default: ``cfg``'s r and alpha where the method has them)."""
    from splice.bench.finetune import _guide, _trainable
    from splice.errors import SpliceError

    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    tuned.requires_grad_(False)
    params = _trainable(tuned, cfg, cfg.targets, options)  # type: ignore[arg-type]
    if cfg.finetune != "full" and _guide(tuned) is not None:
        raise SpliceError(
            f"{cfg.finetune} trains with a teacher-gated gradient on classification logits",
            fix="not wired to the answer-token loss of a causal LM",
        )
    tuned.eval()  # no dropout
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    next_batch = batch_stream(len(enc), cfg.batch_size, seed)

    def micro_loss(step: int) -> tuple[torch.Tensor, int]:
        idx = next_batch()
        loss, _ = answer_loss(tuned, enc, [int(i) for i in idx], pad)
        return loss, len(idx)

    device = next(model.parameters()).device
    aux = tuned if cfg.finetune != "full" else None  # aux loss and after_step (AdaLoRA)
    state = fit(TrainStep(micro_loss, opt, device=device, aux=aux), cfg.steps, on_step=on_step)
    return tuned, params, state


def finetune_lm(
    model: nn.Module,
    enc: Encoded,
    cfg: LMTrainConfig,
    seed: int,
    pad: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, Delta], dict[str, Any]]:
    """Train a LoRA on a copy of ``model`` (:func:`train_lm`); returns its ΔW per base tensor
    and metadata."""
    from splice import adapters

    tuned, params, state = train_lm(model, enc, cfg, seed, pad, on_step)
    deltas = {n: d for n, d in adapters.adapter_deltas(tuned).items()}
    meta = {
        "train_s": round(state.seconds, 2),
        "first_loss": state.history[0] if state.history else None,
        "final_loss": state.history[-1] if state.history else None,
        "trainable": sum(p.numel() for p in params),
    }
    return deltas, meta


def lm_entry(model_key: str, data_key: str, task: str, cfg: LMTrainConfig, seed: int) -> Path:
    """The cache entry of one run."""
    key = stable_hash({"model": model_key, "data": data_key, "cfg": cfg.model_dump(), "seed": seed})
    return cache_root() / "bench" / "llm" / f"{task}-{key}"


def load_entry(path: Path) -> tuple[dict[str, Delta], dict[str, Any]] | None:
    """The entry's deltas and metadata, or None if it is absent or does not match its
    manifest."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for name, digest in manifest["files"].items():
            if file_sha256(path / name) != digest:
                return None
        return dict(load_deltas(path / "deltas.safetensors")), manifest["meta"]
    except Exception:  # missing or damaged: retrain
        return None


def finetune_lm_cached(
    model: nn.Module,
    enc: Encoded,
    cfg: LMTrainConfig,
    seed: int,
    pad: int,
    entry: Path,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, Delta], dict[str, Any], bool]:
    """:func:`finetune_lm` through the cache entry ``entry``; returns (deltas, meta, cached)."""
    if (hit := load_entry(entry)) is not None:
        return *hit, True
    start = time.perf_counter()
    deltas, meta = finetune_lm(model, enc, cfg, seed, pad, on_step)
    meta["wall_s"] = round(time.perf_counter() - start, 2)
    with atomic_dir(entry) as tmp:
        save_deltas(deltas, tmp / "deltas.safetensors")
        files = {"deltas.safetensors": file_sha256(tmp / "deltas.safetensors")}
        manifest = {"files": files, "meta": meta, "cfg": cfg.model_dump(), "seed": seed}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return deltas, meta, False
