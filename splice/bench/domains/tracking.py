"""The tracking benchmark of issue #34: LoRAT against full fine-tuning of the same one-stream
tracker, and SEATrack's AMG-LoRA against plain two-stream LoRA on the frozen tracker.

1. A :class:`~splice.domains.backbones.vit.ViT` is pretrained to classify ``fashion_mnist``
   (cached). 2. The one-stream tracker built on it is fine-tuned on synthetic digit sequences
   (:mod:`splice.data.synthetic.tracking`) twice, in full and with LoRAT; both are scored by
   tracking held-out sequences (success AUC, precision, frames/s) and their training steps are
   timed interleaved (one step each in turn, median). 3. The LoRAT tracker, merged and frozen,
   is the RGB tracker SEATrack adapts to visible + thermal input; AMG-LoRA and plain two-stream
   LoRA train the same steps and are scored on all frames and on the dark frames.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from splice.bench.domains.common import cached_pretrain
from splice.bench.domains.common import train as train_loop
from splice.data.synthetic.tracking import Sequences, TrackingConfig, tracking_sequences
from splice.domains.backbones.vit import ViT, ViTConfig
from splice.domains.lorat import OneStreamTracker, add_lora, merge_lora
from splice.domains.seatrack import SEATrack
from splice.domains.tracking import (
    best_box,
    crop,
    foreground_tokens,
    head_loss,
    precision,
    success_auc,
    track,
)
from splice.train.loop import TrainStep

__all__ = ["TrackingBench", "pretrain_vit", "run_tracking"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrackingBench:
    pretrain_steps: int = 400
    steps: int = 300
    seatrack_steps: int = 200
    train_sequences: int = 300
    test_sequences: int = 40
    batch: int = 32
    rank: int = 3
    lr_full: float = 3e-4
    lr_lora: float = 2e-3
    template: int = 16
    search: int = 32
    jitter: float = 8.0
    timing_steps: int = 20
    seed: int = 0


def pretrain_vit(steps: int, seed: int = 0, log: Log = print) -> tuple[ViT, dict]:
    """The backbone, pretrained (cached) on fashion_mnist classification; returns (vit, meta)."""
    from splice.data.registry import TASKS, Caps, load_task

    cfg = ViTConfig()
    torch.manual_seed(seed)
    vit = ViT(cfg)

    def train(model: nn.Module) -> dict:
        data = load_task(TASKS.get("fashion_mnist"), Caps(train=20000, val=500, test=1000))
        x = torch.from_numpy(data.train.x).float() / 255
        y = torch.from_numpy(data.train.y)
        g = torch.Generator().manual_seed(seed)

        def loss(i: int) -> tuple[Tensor, int]:
            idx = torch.randint(len(y), (64,), generator=g)
            return nn.functional.cross_entropy(model(x[idx]), y[idx]), 64

        state = train_loop(model, loss, steps, 1e-3)
        with torch.no_grad():
            xt, yt = torch.from_numpy(data.test.x).float() / 255, torch.from_numpy(data.test.y)
            acc = float((model(xt).argmax(-1) == yt).float().mean())
        log(f"pretrain: fashion_mnist test accuracy {acc:.3f} in {state.seconds:.0f}s")
        return {"accuracy": acc, "seconds": state.seconds}

    key = {"cfg": cfg.to_dict(), "steps": steps, "seed": seed}
    vit, meta = cached_pretrain("vit", key, vit, train)
    if meta["cached"]:
        log(f"pretrain: cached (fashion_mnist test accuracy {meta['accuracy']:.3f})")
    return vit, meta


def sample_pairs(
    seqs: Sequences, streams: tuple[str, ...], b: TrackingBench, g: np.random.Generator, n: int
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """n training pairs: the template cut around the first box, a search crop of a later frame
    centred within ``jitter`` px of the true centre; (templates, searches, fg, truth in crop)."""
    i = g.integers(len(seqs), size=n)
    t = g.integers(1, seqs.boxes.shape[1], size=n)
    box0 = torch.from_numpy(seqs.boxes[i, 0])
    box = torch.from_numpy(seqs.boxes[i, t])
    c0 = (box0[:, :2] + box0[:, 2:]) / 2
    c = (box[:, :2] + box[:, 2:]) / 2 + torch.from_numpy(g.uniform(-b.jitter, b.jitter, (n, 2)))
    templates, searches = [], []
    for s in streams:
        frames = torch.from_numpy(getattr(seqs, s))
        tmpl, corner0 = crop(frames[i, 0], c0, b.template)
        srch, corner = crop(frames[i, t], c.float(), b.search)
        templates.append(tmpl)
        searches.append(srch)
    fg = foreground_tokens(box0 - corner0.repeat(1, 2), b.template, 4)
    return templates, searches, fg, box - corner.repeat(1, 2)


def _loss_fn(
    model: nn.Module, seqs: Sequences, streams: tuple[str, ...], b: TrackingBench, seed: int
) -> Callable[[int], tuple[Tensor, int]]:
    g = np.random.default_rng(seed)
    one = len(streams) == 1

    def loss(i: int) -> tuple[Tensor, int]:
        tm, se, fg, truth = sample_pairs(seqs, streams, b, g, b.batch)
        scores, boxes = model(tm[0], se[0], fg) if one else model(tm, se, fg)
        return head_loss(scores, boxes, truth, 4), b.batch

    return loss


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr, weight_decay=0)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(
    model: nn.Module, seqs: Sequences, streams: tuple[str, ...], b: TrackingBench, steps: int,
    lr: float, what: str, log: Log,
) -> dict:  # fmt: skip
    torch.manual_seed(b.seed)
    loss = _loss_fn(model, seqs, streams, b, b.seed)
    state = train_loop(model, loss, steps, lr, weight_decay=0.0, warmup=0.1)
    log(f"{what}: {steps} steps in {state.seconds:.0f}s, final loss {state.history[-1]:.3f}")
    return {"seconds": state.seconds, "loss": state.history[-1]}


def evaluate(model: nn.Module, seqs: Sequences, streams: tuple[str, ...], b: TrackingBench) -> dict:
    """Causal tracking of every test sequence; success AUC and precision over frames 1…L−1
    (and over the dark frames), frames/s of the batched tracking loop."""
    model.eval()
    one = len(streams) == 1

    def predict(templates: list[Tensor], searches: list[Tensor], fg: Tensor) -> Tensor:
        out = model(templates[0], searches[0], fg) if one else model(templates, searches, fg)
        return best_box(*out)

    frames = [torch.from_numpy(getattr(seqs, s)) for s in streams]
    truth = torch.from_numpy(seqs.boxes)
    start = time.perf_counter()
    pred = track(predict, frames, truth[:, 0], b.template, b.search, 4)
    seconds = time.perf_counter() - start
    model.train()
    p, t = pred[:, 1:], truth[:, 1:]
    dark = torch.from_numpy(seqs.dark)[:, 1:]
    out = {
        "auc": success_auc(p, t),
        "precision": precision(p, t),
        "fps": p.shape[0] * p.shape[1] / seconds,
    }
    if dark.any():
        out["auc_dark"] = success_auc(p[dark], t[dark])
    return out


def step_times(
    models: dict[str, tuple[nn.Module, float]], seqs: Sequences, b: TrackingBench
) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of one training step of each model, timed in turn."""
    runs = {}
    for name, (model, lr) in models.items():
        opt = _optimizer(model, lr)
        runs[name] = TrainStep(_loss_fn(model, seqs, ("rgb",), b, b.seed + 1), opt, grad_clip=1.0)
        for k in range(3):
            runs[name](k)
    wall = {n: [] for n in runs}
    cpu = {n: [] for n in runs}
    for k in range(b.timing_steps):
        for name, step in runs.items():
            w, c = time.perf_counter(), time.process_time()
            step(k)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n])} for n in runs}


def run_tracking(b: TrackingBench = TrackingBench(), log: Log = print) -> dict:
    """Every row of the tracking benchmark (see the module docstring) and the settings."""
    cfg = TrackingConfig()
    vit, pre = pretrain_vit(b.pretrain_steps, b.seed, log)
    train_seqs = tracking_sequences("train", b.train_sequences, cfg, b.seed)
    test_seqs = tracking_sequences("test", b.test_sequences, cfg, b.seed + 1)
    rows: dict[str, dict] = {}

    full = OneStreamTracker(copy.deepcopy(vit), b.template, b.search)
    lorat = add_lora(OneStreamTracker(copy.deepcopy(vit), b.template, b.search), r=b.rank)
    unfused = add_lora(
        OneStreamTracker(copy.deepcopy(vit), b.template, b.search), b.rank, fused=False
    )
    timing = step_times(
        {
            "full": (full, b.lr_full),
            "lorat": (lorat, b.lr_lora),
            "lorat_unfused": (unfused, b.lr_lora),
        },
        train_seqs,
        b,
    )
    log(f"step times (median of {b.timing_steps}, interleaved): {timing}")
    full = OneStreamTracker(copy.deepcopy(vit), b.template, b.search)
    rows["full"] = {"params": trainable(full), "step": timing["full"]}
    rows["full"] |= train(full, train_seqs, ("rgb",), b, b.steps, b.lr_full, "full", log)
    rows["full"] |= evaluate(full, test_seqs, ("rgb",), b)
    log(f"full fine-tune: {rows['full']}")

    lorat = add_lora(OneStreamTracker(copy.deepcopy(vit), b.template, b.search), r=b.rank)
    rows["lorat"] = {"params": trainable(lorat), "step": timing["lorat"]}
    rows["lorat"] |= train(lorat, train_seqs, ("rgb",), b, b.steps, b.lr_lora, "lorat", log)
    merge_lora(lorat)
    rows["lorat"] |= evaluate(lorat, test_seqs, ("rgb",), b)
    rows["lorat_unfused"] = {"params": trainable(unfused), "step": timing["lorat_unfused"]}
    log(f"LoRAT (merged): {rows['lorat']}")

    for name, mutual in (("two_stream_lora", False), ("amg_lora", True)):
        sea = SEATrack(copy.deepcopy(lorat), mutual=mutual)
        rows[name] = {"params": trainable(sea)}
        rows[name] |= train(
            sea, train_seqs, ("rgb", "thermal"), b, b.seatrack_steps, b.lr_lora, name, log
        )
        rows[name] |= evaluate(sea, test_seqs, ("rgb", "thermal"), b)
        log(f"{name}: {rows[name]}")
    return {"settings": asdict(b), "data": cfg.to_dict(), "pretrain": pre, "rows": rows}
