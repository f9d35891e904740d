"""One row of the PEFT track on one task: the lr grid, the pick on test, the measurements.

Every run is :func:`splice.bench.finetune.train` (the linear probe: the same seeded batches
through :func:`splice.train.fit` on frozen features, computed once per task). Measured per
run: seconds per optimizer step (the loop's), peak RSS over the run (``VmHWM`` after a reset
through ``/proc/self/clear_refs``; None where that is not Linux), trainable parameters of the
adapter (unique tensors) and of the head; for the picked run, the bytes of what the row saves
(the adapter via :func:`splice.adapters.save_adapter`, the whole model, or the head).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splice.bench.finetune import FinetuneConfig, Trained, batch_stream, train
from splice.bench.suite import _features
from splice.train.loop import TrainStep, fit

__all__ = [
    "SEARCH_SEEDS",
    "cached",
    "full_grid",
    "run_cached",
    "run_row",
    "search_grids",
    "search_key",
    "search_values",
    "start_row",
]


def _grow(lr: float, way: int) -> float:
    """The next lr on the 1-2-5 ladder, down (way -1) or up (+1)."""
    exp = int(np.floor(np.log10(lr) + 1e-9))
    ladder = [m * 10.0**e for e in (exp - 1, exp, exp + 1) for m in (1, 2, 5)]
    i = min(range(len(ladder)), key=lambda j: abs(ladder[j] - lr))
    return float(f"{ladder[i + way]:.3g}")


def _pick(
    grid: Sequence[float], grow: int, score: Callable[[float], float]
) -> tuple[float, dict[float, float]]:
    """The lr with the best score (ties: the smaller); edges grow up to ``grow`` times."""
    lrs, val = sorted(grid), {}
    while True:
        for lr in lrs:
            if lr not in val:
                val[lr] = score(lr)
        best = max(lrs, key=lambda lr: (val[lr], -lr))
        if grow and best == lrs[0]:
            lrs.insert(0, _grow(best, -1))
        elif grow and best == lrs[-1]:
            lrs.append(_grow(best, +1))
        else:
            return best, val
        grow -= 1


# Measuring one run -----------------------------------------------------------------------------


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: ``/proc/self/clear_refs``)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(x.split()[1]) / 1024 for x in lines if x.startswith("VmHWM")), None)


def _saved_bytes(key: str, model: nn.Module, head: nn.Module) -> int:
    """Bytes on disk of what the row saves: the adapter, the whole model, or the head."""
    from safetensors.torch import save_file

    from splice.adapters import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        if key == "full":
            state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
            save_file(state, str(Path(tmp) / "model.safetensors"))
        elif key == "probe":
            state = {n: p.detach().contiguous() for n, p in head.named_parameters()}
            save_file(state, str(Path(tmp) / "head.safetensors"))
        else:
            save_adapter(model, Path(tmp) / "adapter")
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def _logits(encoder: Any, prepared: Any, module: Any, head: Any, bs: int) -> Tensor:
    with torch.no_grad():  # no graph (and no saved activations) through the trained parameters
        feats = _features(encoder, prepared, None, bs, module)
        return head(feats.to(next(head.parameters()).device)).float().cpu()


class _Rows:
    """The rows ``idx`` of prepared inputs, evaluated in the whole set's length order."""

    def __init__(self, base: Any, idx: np.ndarray) -> None:
        self.base, self.idx = base, idx

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, i: np.ndarray, device: torch.device) -> Any:
        return self.base.batch(self.idx[i], device)

    def eval_order(self) -> np.ndarray:
        rank = np.empty(len(self.base), dtype=np.int64)
        rank[self.base.eval_order()] = np.arange(len(self.base))
        return np.argsort(rank[self.idx], kind="stable")


class Task:
    """One task of one backbone: splits, prepared inputs and (lazily) frozen features."""

    def __init__(self, group: Any, name: str, cfg: Any) -> None:
        self.encoder, self.data, self.cfg = group.encoder, group.data[name], cfg
        self.val, self.test = group.val[name], group.test[name]
        self.frozen: dict[str, Tensor] = {}
        self._train_x: Any = None
        self._have: np.ndarray | None = None  # which train examples' features are computed

    @property
    def train_x(self) -> Any:
        """The train split through ``encoder.prepare`` (tokenised once per task, not per run)."""
        if self._train_x is None:
            self._train_x = self.encoder.prepare(self.data.train.x)
        return self._train_x

    def feats(self, split: str) -> Tensor:
        if split not in self.frozen:
            x = getattr(self, split)
            self.frozen[split] = _features(self.encoder, x, None, self.cfg.eval_batch_size)
        return self.frozen[split]

    def train_feats(self, idx: np.ndarray) -> Tensor:
        """Frozen train features, computed for the examples ``idx`` (and any before): the
        probe's batches visit ``steps × batch`` examples, often far fewer than the split."""
        if self._have is None:
            self._have = np.zeros(len(self.train_x), dtype=bool)
            self.frozen["train"] = torch.zeros(len(self.train_x), self.encoder.dim)
        todo = np.unique(idx[~self._have[idx]])
        if len(todo):
            part = _Rows(self.train_x, todo)
            bs = self.cfg.eval_batch_size
            self.frozen["train"][torch.as_tensor(todo)] = _features(self.encoder, part, None, bs)
            self._have[todo] = True
        return self.frozen["train"]

    def run(self, key: str, lr: float, head_lr: float, seed: int, plan: dict) -> dict:
        """Train one row at one lr and seed; its model and head, and what was measured."""
        _reset_peak()
        cfg = self.cfg
        if key == "probe":
            trained = self._probe(lr, seed)
        else:
            method = "full" if key == "full" else key
            targets = tuple(plan["targets"]) if plan.get("targets") else None
            ft = FinetuneConfig(finetune=method, steps=cfg.steps, batch_size=cfg.batch_size,
                                lr=lr, head_lr=head_lr, targets=targets)  # fmt: skip
            trained = train(self.encoder, self.data, ft, seed, options=plan.get("options", {}),
                            select=plan.get("select"), prepared=self.train_x)  # fmt: skip
        state, params = trained.state, {id(p): p for p in trained.params}
        return {
            "selection": trained.selection,
            "model": trained.model,
            "head": trained.head,
            "s_per_step": state.seconds / max(1, cfg.steps),
            "peak_rss_mb": _peak_mb(),
            "adapter_params": sum(p.numel() for p in params.values()),
            "head_params": sum(p.numel() for p in trained.head.parameters()),
        }

    def _probe(self, lr: float, seed: int) -> Trained:
        torch.manual_seed(seed)
        labels, steps = torch.as_tensor(self.data.train.y), self.cfg.steps
        stream = batch_stream(len(labels), self.cfg.batch_size, seed)
        batches = [torch.as_tensor(stream()) for _ in range(steps)]
        feats = self.train_feats(torch.cat(batches).numpy()) if batches else None
        head = nn.Linear(self.encoder.dim, len(self.data.classes))
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)

        def micro_loss(i: int) -> tuple[Tensor, int]:
            idx = batches[i]
            return nn.functional.cross_entropy(head(feats[idx]), labels[idx]), len(idx)

        state = fit(TrainStep(micro_loss, opt), self.cfg.steps)
        return Trained(None, head, state, [])  # type: ignore[arg-type]

    def score(self, out: dict, split: str, loss: bool = False) -> Any:
        """Accuracy on ``split``; with ``loss``, (accuracy, mean cross-entropy)."""
        labels = getattr(self.data, split).y
        if out["model"] is None:  # the probe: frozen features
            with torch.inference_mode():
                logits = out["head"](self.feats(split)).float()
        else:
            prepared, bs = self.val if split == "val" else self.test, self.cfg.eval_batch_size
            logits = _logits(self.encoder, prepared, out["model"], out["head"], bs)
        acc = float((logits.argmax(-1).numpy() == labels).mean())
        if not loss:
            return acc
        return acc, float(nn.functional.cross_entropy(logits, torch.as_tensor(labels)))


def full_grid(plan: dict) -> bool:
    """Whether the row trains the backbone's own weights (full fine-tuning, ID³) and so takes
    the full fine-tuning lr grid."""
    return plan["key"] == "full" or (plan.get("select") or {}).get("grid") == "full"


def search_values(cls: Any, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The option values the row's selection tries at each lr: the method's ``search``
    (factors on the row's own values; the first variant is the row's own), or none."""
    factors = getattr(cls, "search", ())
    keys = sorted({k for f in factors for k in f})
    own = {k: options.get(k, cls.Config.model_fields[k].default) for k in keys}
    return [{k: own[k] * f.get(k, 1.0) for k in keys} for f in factors]


def search_grids(plan: dict, grid: Sequence[float]) -> list[list[float]]:
    """The lrs each searched variant runs at: the whole grid for the row's own values (the
    first); another only where the method's ``pace`` (R-AMT: K = (init − τ)/lr) lies within
    the paces of the row's own values on the grid."""
    from splice.adapters import METHODS

    variants = plan.get("search") or [{}]
    pace = getattr(METHODS.get(plan["key"]), "pace", None) if len(variants) > 1 else None
    if pace is None:
        return [list(grid) for _ in variants]
    own = [pace(variants[0], lr) for lr in grid]
    inside = [[lr for lr in grid if min(own) <= pace(v, lr) <= max(own)] for v in variants[1:]]
    return [list(grid), *inside]


SEARCH_SEEDS = 2  # a searched row's pick: validation averaged over the first two seeds


def search_key(plan: dict, cfg: Any) -> dict:
    """What a row's selection runs: the searched variants (one, the row's own, if none), the
    lrs each runs at and how many of the first seeds the pick averages (a searched row's
    cache key holds it)."""
    key = plan["key"]
    grid = (
        cfg.full_lr_grid if full_grid(plan) else {"probe": cfg.head_lr_grid}.get(key, cfg.lr_grid)
    )
    n = min(len(cfg.seeds), SEARCH_SEEDS if plan.get("search") else 1)
    lrs = search_grids(plan, grid)
    return {"variants": plan.get("search") or [{}], "lrs": lrs, "seeds": n, "ties": "val loss"}


def run_row(task: Task, plan: dict, head_lr: float, say: Callable[[str], None]) -> dict:
    """The row's lr grid at the first seed (a searched row: at each of its option values, at
    the first two seeds, validation averaged), the pick on test, then the other seeds."""
    cfg, key, best = task.cfg, plan["key"], {}
    sel = search_key(plan, cfg)
    variants, grids, seeds = sel["variants"], sel["lrs"], cfg.seeds[: sel["seeds"]]
    tags = ["".join(f" {k}={x:g}" for k, x in variant.items()) for variant in variants]
    by_seed: dict[str, list[float]] = {}
    by_loss: dict[str, float] = {}

    def pick(v: int) -> tuple[float, dict[float, float]]:
        run_plan = plan | {"options": {**plan.get("options", {}), **variants[v]}}

        def score(lr: float) -> float:
            start = time.perf_counter()
            outs = [
                task.run(key, lr, lr if key == "probe" else head_lr, s, run_plan) for s in seeds
            ]
            accs, losses = zip(*(task.score(out, "val", loss=True) for out in outs), strict=True)
            acc = accs[0] if len(accs) == 1 else round(float(np.mean(accs)), 9)  # ties stay
            # a searched row's ties (accuracy moves in steps of 1/n) go to the lower loss
            tie = -float(np.mean(losses)) if len(variants) > 1 else 0.0
            rank = (acc, tie, -v, -lr)
            if not best or rank > best["rank"]:
                best.update(outs=outs, rank=rank, lr=lr, v=v, plan=run_plan)
            name = f"{lr:g}{tags[v] if v else ''}"
            by_seed[name], by_loss[name] = list(accs), round(-tie, 6)
            each = f" (seeds: {' / '.join(f'{a:.1%}' for a in accs)})" if len(accs) > 1 else ""
            say(f"{key} lr {lr:g}{tags[v]}: val {acc:.1%}{each} "
                f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
            return acc

        return _pick(grids[v], cfg.grow, score)

    # every variant's grid; the best (val, earlier variant, smaller lr) over all of them
    picks = {v: pick(v) for v in range(len(variants)) if grids[v]}
    v, lr, run_plan, outs, val = best["v"], best["lr"], best["plan"], best["outs"], {}
    for i, (_, vals) in picks.items():  # the row's own values keep the bare lr as key
        val |= {f"{k:g}{tags[i] if i else ''}": x for k, x in vals.items()}
    first = outs[0]
    measured = {k: first[k] for k in ("s_per_step", "peak_rss_mb", "adapter_params", "head_params")}
    if first.get("selection") is not None:  # a selector row's choice (layers, entries)
        measured["selection"] = first["selection"]
    if plan.get("search"):  # validation per seed and its mean loss (ties go to the lower)
        measured |= {"picked": variants[v], "val_seeds": by_seed, "val_loss": by_loss}
    measured["saved_bytes"] = _saved_bytes(key, first["model"], first["head"])
    acc = [task.score(out, "test") for out in outs]
    best.clear()
    for seed in cfg.seeds[len(seeds) :]:
        start = time.perf_counter()
        out = task.run(key, lr, lr if key == "probe" else head_lr, seed, run_plan)
        acc.append(task.score(out, "test"))
        say(f"{key} seed {seed}: test {acc[-1]:.1%} ({time.perf_counter() - start:.1f} s)")
    return {"lr": lr, "val": val, "acc": acc, **measured}


def cached(path: Path, compute: Callable[[], dict]) -> tuple[dict, bool]:
    if path.is_file():
        try:
            return json.loads(path.read_text()), True
        except ValueError:  # a damaged entry is recomputed
            pass
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out, False


def run_cached(row: dict, path: Path, compute: Callable[[], dict]) -> dict:
    """Fill ``row`` with :func:`cached`'s outcome (and ``cached``); a method that rejects the
    model (SpliceError) makes it an n/a row, any other exception an error row. Returns the
    outcome ({} when it failed)."""
    from splice.errors import SpliceError

    try:
        out, was = cached(path, compute)
    except SpliceError as e:  # a structure the method rejects on this model
        row |= {"status": "n/a", "reason": f"{row['key']} rejects it: {e}"}
        out, was = {}, False
    except Exception as e:  # the row's error; the other rows still run
        row |= {"status": "error", "error": f"{type(e).__name__}: {e}"}
        out, was = {}, False
    row |= out | {"cached": was}
    return out


def start_row(rows: list[dict], plan: dict, suite: str, task: str) -> dict | None:
    """Append the row of ``plan`` on ``task`` to ``rows``; None when it does not run (its
    plan has a reason, n/a, or an error)."""
    row = {**plan, "suite": suite, "task": task, "status": "ok"}
    rows.append(row)
    if plan.get("reason") or plan.get("error"):
        row["status"] = "n/a" if plan.get("reason") else "error"
        return None
    return row
