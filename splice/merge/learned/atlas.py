"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al., NeurIPS 2024).

merging.md §5: ``θ^(b) = θ₀^(b) + Σ_i Λ_{i,b}·τ_i^(b)`` with one coefficient per task vector
and block (``blockwise``; otherwise one per task vector), optionally per random group of each
block's entries (aTLAS×K, ``partitions=K``, a fixed seeded assignment; all tensor ranks take
part, unlike the released code, which updates only 2-D ones). Λ starts at 0 — the pretrained
model — and is trained with AdamW (weight decay 0.1 pulls it back to 0), gradient-norm clip 1.
Objectives:

- ``"ce"``: cross-entropy summed over tasks on labeled examples (task addition on validation
  data; few-shot adaptation with ``lr=0.1, schedule="cosine"``), keeping the coefficients with
  the best average accuracy on those examples every ``eval_every`` steps (the initial model
  included), as the code does;
- ``"ufm"``: unsupervised FixMatch (§5.4): the initial model's argmax labels the top
  ``min(N/(10·C), 100)`` most confident examples per class ("trusted", weight 1); the others
  take the current prediction on the plain input as target when its confidence exceeds
  ``threshold``; the loss is the weighted cross-entropy on ``augment(batch)`` (the strong view;
  no augmentation when None). ``as_coded`` reproduces the released code, where every example
  is trusted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from splice.errors import SpliceError
from splice.merge.base import HyperParams, tensor_seed
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, Samples, chunks, progress_bar, streams
from splice.merge.learned._functional import (
    Forward,
    Head,
    Network,
    TaskVectors,
    accumulate_grad,
    resolve_device,
    to_cpu,
)

__all__ = ["Params", "atlas", "num_coefficients"]


class Params(HyperParams):
    objective: Literal["ce", "ufm"] = Field("ce", description="'ce' (labeled) or 'ufm' (not)")
    blockwise: bool = Field(True, description="one coefficient per task vector and block")
    partitions: int = Field(1, ge=1, description="aTLAS×K: random groups per block")
    lr: float = Field(1e-3, description="AdamW learning rate")
    schedule: Literal["constant", "cosine"] = Field("constant", description="lr schedule")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on Λ")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    steps: int = Field(500, ge=0, description="optimisation steps")
    batch_size: int = Field(16, ge=1, description="examples per task per step")
    eval_every: int = Field(
        100, ge=0, description="'ce': select the best Λ every N steps (0: last)"
    )
    threshold: float = Field(0.99, description="'ufm': confidence for untrusted pseudo-labels")
    as_coded: bool = Field(False, description="'ufm': every example trusted (released code)")


def num_coefficients(tasks: int, blocks: int, partitions: int = 1, blockwise: bool = True) -> int:
    """Learnable coefficients: ``n·B·K`` blockwise, ``n`` otherwise (§5.5)."""
    return tasks * blocks * partitions if blockwise else tasks


def _groups(tv: TaskVectors, k: int, seed: int, device: torch.device) -> dict[str, Tensor]:
    """A fixed random group in ``0..k-1`` for every entry of every block, seeded per name."""
    out = {}
    for n in tv.names:
        g = torch.Generator().manual_seed(tensor_seed(seed, n))
        out[n] = torch.randint(k, tv.base[n].shape, generator=g).to(device)
    return out


def _merge(tv: TaskVectors, coef: Tensor, groups: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if coef.dim() == 1:  # (n,)
        return tv.merge(coef)
    if groups is None:  # (n, B)
        return tv.merge(coef.T)
    return {  # (n, B, K): entry e of block b scales by Λ[:, b, group(e)]
        name: tv.base[name] + tv.combine(name, coef[:, b, :][:, groups[name]])
        for b, name in enumerate(tv.names)
    }


def _ce(
    net: Network, task: str, batch: Any, labels: Tensor, weights: Mapping[str, Tensor]
) -> Tensor:
    return F.cross_entropy(net.logits(weights, task, batch), labels)


def _ufm(
    net: Network,
    task: str,
    batch: Any,
    target: Tensor,
    trusted: Tensor,
    threshold: float,
    augment: Callable[[Any], Any] | None,
    weights: Mapping[str, Tensor],
) -> Tensor:
    logits = net.logits(weights, task, augment(batch) if augment else batch)
    if augment is None:
        weak = logits.detach().softmax(-1)
    else:
        with torch.no_grad():
            weak = net.logits(weights, task, batch).softmax(-1)
    conf, guess = weak.max(-1)
    target = torch.where(trusted, target, guess)
    w = torch.where(trusted, torch.ones_like(conf), (conf > threshold).to(conf.dtype))
    ce = F.cross_entropy(logits, target, reduction="none")
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


@torch.no_grad()
def _predict(
    net: Network, weights: Mapping[str, Tensor], task: str, s: Samples, bs: int, dev: torch.device
) -> Tensor:
    return torch.cat(
        [net.logits(weights, task, s.take(i, dev)[0]).float().cpu() for i in chunks(len(s), bs)]
    )


def _trusted(probs: Tensor, as_coded: bool) -> Tensor:
    """Per class, the ``min(N // (10·C), 100)`` examples most confidently of that class."""
    n, c = probs.shape
    out = torch.zeros(n, dtype=torch.bool)
    if as_coded:
        return out.fill_(True)
    k = min(n // (c * 10), 100)
    if k:
        for j in range(c):
            out[probs[:, j].topk(k).indices] = True
    return out


def atlas(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    *,
    heads: Mapping[str, Head] | None = None,
    forward: Forward | None = None,
    objective: Literal["ce", "ufm"] = "ce",
    blockwise: bool = True,
    partitions: int = 1,
    lr: float = 1e-3,
    schedule: Literal["constant", "cosine"] = "constant",
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    steps: int = 500,
    batch_size: int = 16,
    eval_every: int = 100,
    threshold: float = 0.99,
    as_coded: bool = False,
    augment: Callable[[Any], Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Learn aTLAS coefficients on ``data`` ({task: (inputs, labels)} for ``"ce"``, inputs
    for ``"ufm"``); merge with them.

    Returns the merged tensors and Λ: ``(n,)``, ``(n, B)`` or ``(n, B, K)``, blocks in
    ``info["names"]`` order; ``info["num_coefficients"]`` counts them.

    Raises:
        SpliceError: ``"ce"`` without labels, or ``partitions > 1`` without ``blockwise``.
    """
    start = time.perf_counter()
    if partitions > 1 and not blockwise:
        raise SpliceError("aTLAS partitions need blockwise coefficients", fix="set blockwise")
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward, heads, tv.tasks)
    feeds = streams(data, tv.tasks, batch_size, seed)
    samples = {t: f.samples for t, f in feeds.items()}
    if objective == "ce" and any(s.labels is None for s in samples.values()):
        raise SpliceError("aTLAS objective 'ce' needs labels", fix="pass {task: (inputs, labels)}")
    dtype = tv.coef_dtype
    shape = (
        (tv.num_tasks, tv.num_blocks, partitions)
        if partitions > 1
        else (tv.num_tasks, tv.num_blocks)
    )
    coef = torch.zeros(shape if blockwise else (tv.num_tasks,), device=dev, dtype=dtype)
    coef.requires_grad_()
    groups = _groups(tv, partitions, seed, dev) if partitions > 1 else None
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        if schedule == "cosine"
        else None
    )

    pseudo: dict[str, tuple[Tensor, Tensor]] = {}
    if objective == "ufm":
        with net.frozen(), torch.no_grad():
            w0 = _merge(tv, coef, groups)
            for t, s in samples.items():
                probs = _predict(net, w0, t, s, batch_size, dev).softmax(-1)
                pseudo[t] = (probs.argmax(-1), _trusted(probs, as_coded))

    def accuracy() -> float:
        with torch.no_grad():
            w = _merge(tv, coef, groups)
            accs = []
            for t, s in samples.items():
                pred = _predict(net, w, t, s, batch_size, dev).argmax(-1)
                assert s.labels is not None
                accs.append(float((pred == s.labels.cpu()).float().mean()))
            return sum(accs) / len(accs)

    select = objective == "ce" and eval_every > 0
    best = (accuracy(), coef.detach().clone(), 0) if select else None
    history: list[float] = []
    with net.frozen(), progress_bar(f"aTLAS ({objective})", steps, progress) as update:
        for step in range(steps):
            losses: list[Callable[[Mapping[str, Tensor]], Tensor]] = []
            for t, feed in feeds.items():
                batch, labels, idx = feed.next(dev)
                if objective == "ce":
                    losses.append(partial(_ce, net, t, batch, labels))
                else:
                    target, trusted = (x[torch.from_numpy(idx)].to(dev) for x in pseudo[t])
                    losses.append(partial(_ufm, net, t, batch, target, trusted, threshold, augment))
            opt.zero_grad(set_to_none=True)
            history.append(accumulate_grad(_merge(tv, coef, groups), losses))
            torch.nn.utils.clip_grad_norm_([coef], grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            update(step + 1, history[-1])
            if best is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                acc = accuracy()
                if acc > best[0]:
                    best = (acc, coef.detach().clone(), step + 1)
    final = best[1] if best is not None else coef.detach()
    with torch.no_grad():
        weights = to_cpu(_merge(tv, final, groups), tv.base)
    info: dict[str, Any] = {
        "objective": objective,
        "tasks": list(tv.tasks),
        "names": list(tv.names),
        "num_coefficients": num_coefficients(tv.num_tasks, tv.num_blocks, partitions, blockwise),
        "seconds": time.perf_counter() - start,
    }
    if best is not None:
        info.update(selected_step=best[2], selected_accuracy=best[0])
    if objective == "ufm":
        info["trusted"] = {t: int(p[1].sum()) for t, p in pseudo.items()}
    return LearnedMerge(weights, final.cpu(), history, info)


learned.register("atlas")(
    LearnedMethod(
        name="atlas",
        pretty_name="aTLAS",
        reference="https://arxiv.org/abs/2407.02880 (merging.md §5)",
        fn=atlas,
        Params=Params,
        data="labeled",
        needs_labels=lambda p: getattr(p, "objective", "ce") == "ce",
        short={"steps": 100, "lr": 5e-3, "eval_every": 25},
    )
)
