"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al., NeurIPS 2024).

merging.md §5 and its Errata: ``θ^(b) = θ₀^(b) + Σ_i Λ_{i,b}·τ_i^(b)`` with one coefficient per
task vector and block (``blockwise``; otherwise one per task vector), optionally per random
group of each block's entries (aTLAS×K, ``partitions=K``, a fixed seeded assignment; all
tensor ranks take part, unlike the released code, which updates only 2-D ones). Λ starts at
0 — the pretrained model — and is trained with AdamW (weight decay 0.1 pulls it back to 0).

Gradient clipping (``clip``): the released code clips with ``clip_grad_norm_(·, 1.0)`` while
the gradients are still multiplied by the fp16 loss scale (``GradScaler``: 2¹⁶, doubling every
2,000 steps; ``unscale_`` is never called), so the true gradient is clipped at norm
``1/2¹⁶``: every step's gradient is clipped, and as AdamW is invariant to the gradient's scale
(up to its ε), each update follows the *unit-norm* gradient direction — steps with small
gradients weigh as much as steps with large ones. ``clip="scaled"`` (default) does exactly
that: it clips at ``grad_clip / scale``. ``clip="unscaled"`` clips the true gradient at
``grad_clip``, so it acts only on gradients above it (the usual meaning; splice's earlier
default).

Objectives:

- ``"ce"``: cross-entropy summed over tasks on labeled examples (task addition on validation
  data; few-shot adaptation with ``lr=0.1, schedule="cosine"``). Model selection as coded:
  once per epoch (an epoch is ``⌈N_min / batch_size⌉`` steps — the smallest task drives it,
  as in the code — and once more after the last step if that is no epoch end), the merged
  model's accuracy on the given examples is divided by each task's fine-tuned model's
  accuracy on them (``θ₀ + τ_t`` with task t's head; ``info["expert_accuracy"]``) and the
  coefficients with the best mean *normalized* accuracy are kept, the initial (zero-shot)
  model included as the first "best" (``eval_every=N``: every N steps instead; ``0``: keep
  the last coefficients);
- ``"ufm"``: unsupervised FixMatch (§5.4, ``learn_ufm.py``): the initial model's argmax labels
  the top ``min(N/(10·C), 100)`` most confident examples per class ("trusted"); each batch
  takes ¼ of its examples from the trusted set and ¾ from the others (the code's
  ``TwoStreamBatchSampler``). Targets: the one-hot initial label (weight 1) for a trusted
  example; for the others the *soft* prediction ``q = softmax`` of the current model on the
  plain input, weighted by ``[max q > threshold]``; the loss is ``Σ w·CE(strong, q) / Σ w``
  with the strong view ``augment(batch)`` (no augmentation when None). ``as_coded``
  reproduces the released code, whose flag vector marks every example trusted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from splice.errors import SpliceError
from splice.merge.base import HyperParams, tensor_seed
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import (
    Progress,
    Samples,
    Stream,
    chunks,
    progress_bar,
    streams,
)
from splice.merge.learned._functional import (
    Forward,
    Head,
    Network,
    TaskVectors,
    accumulate_grad,
    resolve_device,
    to_cpu,
)

__all__ = ["Params", "atlas", "normalized_mean", "num_coefficients", "ufm_loss"]


class Params(HyperParams):
    objective: Literal["ce", "ufm"] = Field("ce", description="'ce' (labeled) or 'ufm' (not)")
    blockwise: bool = Field(True, description="one coefficient per task vector and block")
    partitions: int = Field(1, ge=1, description="aTLAS×K: random groups per block")
    lr: float = Field(1e-3, description="AdamW learning rate")
    schedule: Literal["constant", "cosine"] = Field("constant", description="lr schedule")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on Λ")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    clip: Literal["scaled", "unscaled"] = Field(
        "scaled", description="'scaled': on loss-scaled gradients, as coded; or 'unscaled'"
    )
    steps: int = Field(500, ge=0, description="optimisation steps")
    batch_size: int = Field(16, ge=1, description="examples per task per step")
    eval_every: int | None = Field(
        None, ge=0, description="'ce': select the best Λ per epoch (None), every N steps, 0: last"
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


def ufm_loss(
    strong: Tensor, weak: Tensor, target: Tensor, trusted: Tensor, threshold: float
) -> Tensor:
    """The UFM loss of ``learn_ufm.py``: ``Σ w·CE(strong, q) / Σ w`` with soft targets.

    ``q`` is ``softmax(weak)`` (no gradient) for an untrusted example, weighted by
    ``[max q > threshold]``, and the one-hot ``target`` (the initial model's label), weight 1,
    for a trusted one.
    """
    q = weak.detach().softmax(-1)
    q = torch.where(trusted[:, None], F.one_hot(target, q.shape[-1]).to(q.dtype), q)
    w = torch.where(trusted, torch.ones_like(q[:, 0]), (q.max(-1).values > threshold).to(q.dtype))
    ce = F.cross_entropy(strong, q, reduction="none")
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


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
        weak = logits
    else:
        with torch.no_grad():
            weak = net.logits(weights, task, batch)
    return ufm_loss(logits, weak, target, trusted, threshold)


class _TwoStreams:
    """UFM batches: ``batch_size // 4`` examples from the trusted set, the rest from the others
    (each an endless seeded shuffle; one set alone fills the batch if the other is empty)."""

    def __init__(self, samples: Samples, trusted: Tensor, batch_size: int, seed: tuple[int, ...]):
        idx = torch.arange(len(samples))
        pools = (idx[~trusted], idx[trusted])
        k = batch_size // 4 if len(pools[0]) else batch_size
        k = k if len(pools[1]) else 0
        sizes = (batch_size - k, k)
        self.samples = samples
        self.parts = [
            Stream(Samples(pool), n, (*seed, j))
            for j, (pool, n) in enumerate(zip(pools, sizes, strict=True))
            if n > 0 and len(pool)
        ]

    def next(self, device: torch.device) -> tuple[Any, None, np.ndarray]:
        cpu = torch.device("cpu")
        idx = np.concatenate([part.next(cpu)[0].numpy() for part in self.parts])
        return self.samples.take(idx, device)[0], None, idx


@torch.no_grad()
def _predict(
    net: Network, weights: Mapping[str, Tensor], task: str, s: Samples, bs: int, dev: torch.device
) -> Tensor:
    return torch.cat(
        [net.logits(weights, task, s.take(i, dev)[0]).float().cpu() for i in chunks(len(s), bs)]
    )


def _trusted(probs: Tensor) -> Tensor:
    """Per class, the ``min(N // (10·C), 100)`` examples most confidently of that class."""
    n, c = probs.shape
    out = torch.zeros(n, dtype=torch.bool)
    k = min(n // (c * 10), 100)
    if k:
        for j in range(c):
            out[probs[:, j].topk(k).indices] = True
    return out


def normalized_mean(accuracy: Mapping[str, float], expert: Mapping[str, float]) -> float:
    """aTLAS' selection score: ``mean_t accuracy_t / expert_t`` (the fine-tuned model's)."""
    return sum(a / max(expert[t], 1e-9) for t, a in accuracy.items()) / len(accuracy)


def _clip(coef: Tensor, mode: str, max_norm: float, step: int) -> None:
    """Clip ``coef.grad`` in place: at ``max_norm`` (``"unscaled"``) or, as the released code does
    on fp16 loss-scaled gradients, at ``max_norm`` over GradScaler's scale at ``step``."""
    scale = 2.0 ** (16 + step // 2000) if mode == "scaled" else 1.0
    torch.nn.utils.clip_grad_norm_([coef], max_norm / scale)


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
    clip: Literal["scaled", "unscaled"] = "scaled",
    steps: int = 500,
    batch_size: int = 16,
    eval_every: int | None = None,
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
    ``info["names"]`` order; ``info["num_coefficients"]`` counts them. With selection,
    ``info["evaluations"]`` lists ``{"step", "accuracy": {task: acc}, "normalized"}`` per
    evaluation and ``selected_step`` / ``selected_normalized`` / ``selected_accuracy`` the one
    kept.

    Raises:
        SpliceError: ``"ce"`` without labels, or ``partitions > 1`` without ``blockwise``.
    """
    start = time.perf_counter()
    if partitions > 1 and not blockwise:
        raise SpliceError("aTLAS partitions need blockwise coefficients", fix="set blockwise")
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward, heads, tv.tasks)
    feeds: dict[str, Stream | _TwoStreams] = dict(streams(data, tv.tasks, batch_size, seed))
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
            for i, (t, s) in enumerate(samples.items()):
                probs = _predict(net, w0, t, s, batch_size, dev).softmax(-1)
                top = _trusted(probs)
                pseudo[t] = (probs.argmax(-1), torch.ones_like(top) if as_coded else top)
                feeds[t] = _TwoStreams(s, top, batch_size, (seed, i))

    def accuracy(w: Mapping[str, Tensor], tasks: Iterable[str]) -> dict[str, float]:
        with torch.no_grad():
            out = {}
            for t in tasks:
                s = samples[t]
                pred = _predict(net, w, t, s, batch_size, dev).argmax(-1)
                assert s.labels is not None
                out[t] = float((pred == s.labels.cpu()).float().mean())
            return out

    select = objective == "ce" and eval_every != 0
    expert: dict[str, float] = {}
    evaluations: list[dict[str, Any]] = []
    best: tuple[float, Tensor, int] | None = None

    def evaluate(step: int) -> None:
        nonlocal best
        acc = accuracy(_merge(tv, coef, groups), tv.tasks)
        score = normalized_mean(acc, expert)
        evaluations.append({"step": step, "accuracy": acc, "normalized": score})
        if best is None or score > best[0]:
            best = (score, coef.detach().clone(), step)

    if select:
        with torch.no_grad():
            for i, t in enumerate(tv.tasks):
                own = {n: tv.base[n] + tv.stacked[n][i] for n in tv.names}
                expert.update(accuracy(own, [t]))
        every = eval_every or math.ceil(min(len(s) for s in samples.values()) / batch_size)
        evaluate(0)
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
            _clip(coef, clip, grad_clip, step)
            opt.step()
            if sched is not None:
                sched.step()
            update(step + 1, history[-1])
            if select and ((step + 1) % every == 0 or step + 1 == steps):
                evaluate(step + 1)
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
        chosen = next(e for e in evaluations if e["step"] == best[2])
        info.update(
            expert_accuracy=expert,
            evaluations=evaluations,
            selected_step=best[2],
            selected_normalized=best[0],
            selected_accuracy=sum(chosen["accuracy"].values()) / len(chosen["accuracy"]),
        )
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
        short={"steps": 100, "lr": 5e-3},
    )
)
