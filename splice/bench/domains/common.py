"""What the domain benchmarks share: a cached pretrained state, training through the one loop,
seeded batch orders, result rows and their table.

Pretrained backbones are cached under ``<cache>/domains/<name>-<key>/`` (``model.safetensors``
and ``meta.json``), keyed by a hash of everything that determines them; entries are written
through :func:`splice.io.atomic_dir`, so an interrupted run leaves none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splice.adapters import trainable_parameters
from splice.data.cache import cache_root, stable_hash
from splice.io import atomic_dir
from splice.train.loop import LoopState, TrainStep, fit
from splice.train.schedule import linear_warmup_decay

__all__ = ["Row", "batch_order", "cached_pretrain", "format_rows", "train"]


def cached_pretrain(
    name: str, key: dict[str, Any], model: nn.Module, build: Callable[[nn.Module], dict[str, Any]]
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``model``'s pretrained state from the cache, or ``build(model)`` (it trains in place
    and returns facts to keep, e.g. its accuracy) and store it. Returns (model, facts) where
    facts carry ``cached`` (bool) too."""
    from safetensors.torch import load_file, save_file

    path = cache_root() / "domains" / f"{name}-{stable_hash(key)}"
    if (path / "meta.json").exists():
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors")))
            return model, {**json.loads((path / "meta.json").read_text()), "cached": True}
        except Exception:  # a damaged entry is rebuilt and replaced
            pass
    facts = build(model)
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**facts, "key": key}, indent=2, default=str))
    return model, {**facts, "cached": False}


def batch_order(n: int, batch: int, seed: int) -> Callable[[int], np.ndarray]:
    """Step → indices of its batch: reshuffled epochs of ``range(n)`` (seeded)."""
    per_epoch = max(1, n // batch)
    perms: dict[int, np.ndarray] = {}

    def idx(step: int) -> np.ndarray:
        epoch, i = divmod(step, per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return perms[epoch][i * batch : (i + 1) * batch]

    return idx


def train(
    model: nn.Module,
    loss: Callable[[int], tuple[Tensor, int]],
    steps: int,
    lr: float,
    *,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    grad_clip: float = 1.0,
    lrs: dict[str, float] | None = None,
) -> LoopState:
    """AdamW on ``model``'s trainable parameters, linear warmup/decay, through the one loop.

    ``lrs`` maps a parameter-name prefix to its own peak LR (the rest use ``lr``).
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            rate = next((v for k, v in (lrs or {}).items() if name.startswith(k)), lr)
            groups.setdefault(rate, []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": r} for r, ps in groups.items()], weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps, int(warmup * steps)))
    model.train()
    return fit(TrainStep(loss, opt, sched, grad_clip=grad_clip), steps)


@dataclass
class Row:
    """One method's result: its score, trainable/total parameters and wall time."""

    method: str
    score: float
    trainable: int
    total: int
    seconds: float
    detail: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        klass, method: str, model: nn.Module, score: float, start: float, detail: dict | None = None
    ) -> Row:
        count = trainable_parameters(model)
        return klass(
            method, score, count.trainable, count.total, time.perf_counter() - start, detail or {}
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_rows(rows: list[Row], ref: str, ref_params: str | None = None) -> str:
    """A markdown table; ``score/ref`` and ``params/ref`` are ratios to the row named ``ref``
    (``ref_params``: the row whose trainable count the param ratio divides by)."""
    by = {r.method: r for r in rows}
    base, pbase = by[ref], by[ref_params or ref]
    keys = sorted({k for r in rows for k in r.detail})
    head = ["method", "score", f"score − {ref}", *keys, "trainable", f"% of {pbase.method}", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{r.score:.2f}", f"{r.score - base.score:+.2f}"]
        cells += [f"{r.detail[k]:.2f}" if k in r.detail else "" for k in keys]
        cells += [
            f"{r.trainable:,}",
            f"{100 * r.trainable / pbase.trainable:.1f}",
            f"{r.seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
