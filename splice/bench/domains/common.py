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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splice.adapters import trainable_parameters
from splice.data.cache import cache_root, stable_hash
from splice.errors import SpliceError
from splice.io import atomic_dir
from splice.train.loop import LoopState, TrainStep, fit
from splice.train.schedule import linear_warmup_decay

__all__ = [
    "Row",
    "Setup",
    "batch_order",
    "cached_pretrain",
    "format_rows",
    "grid_options",
    "plot_rows",
    "report",
    "run_grid",
    "train",
]


@dataclass(frozen=True)
class Setup:
    """Steps, sizes and learning rates every domain benchmark has (defaults: minutes on one
    core); ``full_lr`` is full fine-tuning's, ``lr`` every adapter's. The last ``val`` of the
    ``train`` examples are held out for choosing a learning rate, not trained on."""

    pretrain_steps: int = 600
    pretrain_lr: float = 1e-3
    train: int = 4000
    val: int = 500
    test: int = 1000
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    full_lr: float = 3e-4
    seed: int = 0

    def splits(self) -> tuple[slice, slice, slice]:
        """Train, validation and test slices of the ``train + test`` downstream examples."""
        if not 0 < self.val < self.train:
            raise SpliceError(f"val={self.val} of train={self.train}", fix="0 < val < train")
        cut = self.train - self.val
        return slice(0, cut), slice(cut, self.train), slice(self.train, self.train + self.test)

    def pretrain_key(self, *names: str) -> dict[str, Any]:
        """The settings that determine the pretrained backbone: ``pretrain*``, seed, ``names``."""
        keep = {"seed", *names}
        return {k: v for k, v in asdict(self).items() if k.startswith("pretrain") or k in keep}


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


def _is_head(name: str) -> bool:
    return name.startswith(("head.", "heads.")) or ".head." in name


@dataclass
class Row:
    """One method's result: its score, trainable/total parameters and wall time."""

    method: str
    score: float
    trainable: int
    total: int
    seconds: float
    detail: dict[str, float] = field(default_factory=dict)
    own: int = 0
    """Trainable parameters outside the task heads (every method trains its own heads)."""

    @classmethod
    def of(
        klass, method: str, model: nn.Module, score: float, start: float, detail: dict | None = None
    ) -> Row:
        count = trainable_parameters(model)
        own = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and not _is_head(n)
        )
        seconds = time.perf_counter() - start
        return klass(method, score, count.trainable, count.total, seconds, detail or {}, own)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_rows(rows: list[Row], ref: str, ref_params: str | None = None) -> str:
    """A markdown table: each row's score and its difference to the row named ``ref``, its
    trainable parameters with and without the task heads, and both as % of ``ref_params``'s
    (default ``ref``)."""
    by = {r.method: r for r in rows}
    base, pbase = by[ref], by[ref_params or ref]
    keys = sorted({k for r in rows for k in r.detail})
    head = ["method", "score", f"Δ {ref}", *keys, "trainable", "w/o heads"]
    head += [f"% of {pbase.method}", f"w/o heads, % of {pbase.method}", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{r.score:.2f}", f"{r.score - base.score:+.2f}"]
        cells += [f"{r.detail[k]:.3g}" if k in r.detail else "" for k in keys]
        cells += [f"{r.trainable:,}", f"{r.own:,}", f"{100 * r.trainable / pbase.trainable:.1f}"]
        cells += [f"{100 * r.own / max(pbase.own, 1):.1f}", f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_options(parser: Any, methods: tuple[str, ...]) -> Any:
    """Add ``--methods``, ``--lr-grid`` and ``--study`` to a benchmark script's ``parser``
    (``benchmarks/_domains.py`` gives the setup's own options); returns it."""

    def floats(s: str) -> tuple[float, ...]:
        return tuple(float(v) for v in s.split(","))

    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=methods)
    parser.add_argument("--lr-grid", type=floats, default=(1.0,), help="LR multiples, e.g. 1,3,10")
    parser.add_argument("--study", action="store_true", help="add the study's variants")
    return parser


def run_grid(
    methods: tuple[str, ...],
    grid: tuple[float, ...],
    base_lr: Callable[[str], float],
    run: Callable[[str, str, float], Row],
    log: Callable[[str], None] = print,
) -> tuple[list[Row], list[Row]]:
    """``run(method, name, lr)`` for every method at ``base_lr(method) × g`` for ``g`` in
    ``grid``; returns every row and, per method, the row of best validation score (named
    after the method, its LR in ``detail["lr"]``)."""
    every, best = [], []
    for m in methods:
        mine = []
        for g in grid:
            lr = base_lr(m) * g
            row = run(m, m if len(grid) == 1 else f"{m} lr={lr:g}", lr)
            row.detail["lr"] = lr
            log(
                f"{row.method}: test {row.score:.2f}, val {row.detail.get('val', float('nan')):.2f}"
            )
            mine.append(row)
        every += mine
        top = max(mine, key=lambda r: r.detail.get("val", r.score))
        best.append(replace(top, method=m, detail=dict(top.detail)))
    return every, best


def run_study(
    setup: Setup,
    methods: tuple[str, ...],
    grid: tuple[float, ...],
    bench: tuple[Callable[[Any], tuple[Any, dict]], Callable[[Any], Any], Callable[..., Row]],
    held_out: str,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[Row], list[Row], Callable[..., Row]]:
    """The shared body of the domain benchmarks. ``bench = (pretrained, load, run_method)``
    of a bench module: the (cached) pretrained backbone, the data, and :func:`run_grid` over
    ``methods`` at the LR multiples ``grid`` (``full`` at ``setup.full_lr``, the rest at
    ``setup.lr``). Returns ``(facts, every, best, again)`` where ``again(method, name,
    **options)`` trains one more variant of ``method`` at the LR its grid chose and appends it
    to ``best``."""
    pretrained, load, run_method = bench
    backbone, facts = pretrained(setup)
    how = "cached" if facts["cached"] else f"{facts['seconds']:.0f} s"
    log(f"backbone: {facts['accuracy']:.1f}% on held-out {held_out} ({how})")
    data = load(setup)
    every, best = run_grid(
        methods,
        grid,
        lambda m: setup.full_lr if m == "full" else setup.lr,
        lambda m, name, lr: run_method(m, setup, backbone, data, name=name, lr=lr),
        log,
    )

    def again(method: str, name: str, **options: Any) -> Row:
        lr = next(r.detail["lr"] for r in best if r.method == method)
        row = run_method(method, setup, backbone, data, name=name, lr=lr, **options)
        row.detail["lr"] = lr
        best.append(row)
        log(f"{name}: {row.score:.2f} (lr {lr:g})")
        return row

    return facts, every, best, again


def report(
    rows: list[Row],
    facts: dict,
    setup: Setup,
    args: Any,
    ref: str,
    title: str,
    every: list[Row] | None = None,
) -> None:
    """Print the table (differences and parameter shares against ``ref``) — first of
    ``every`` row of an LR grid if given — and write the JSON and the plot of ``rows`` where
    ``args`` asks for them."""
    print(f"\nsteps {setup.steps}, pretrain steps {setup.pretrain_steps}, seed {setup.seed}")
    if every and len(every) > len(rows):
        print(format_rows(every, every[0].method, every[0].method), "\n\nbest LR by validation:")
    print(format_rows(rows, ref, ref))
    if args.out:
        out = {"pretrain": facts, "rows": [r.to_dict() for r in rows]}
        out["every"] = [r.to_dict() for r in every or rows]
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if args.plot:
        plot_rows(rows, args.plot, f"{title} ({setup.steps} steps)")


def plot_rows(rows: list[Row], path: str, title: str) -> None:
    """Score against trainable parameters outside the heads (log scale), one labelled point
    per row, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(max(r.own, 1), r.score)
        ax.annotate(r.method, (max(r.own, 1), r.score), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters outside the task heads")
    ax.set_ylabel("test score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
