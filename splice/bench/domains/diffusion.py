"""The diffusion-alignment benchmark of issue #34: HyperAlign against reward fine-tuning of the
denoiser and best-of-N sampling.

1. A class-conditional :class:`~splice.domains.backbones.ddpm.Denoiser` is pretrained on the
   ``mnist_5k`` digits and a :class:`~splice.domains.backbones.reward.RewardClassifier` on the
   same training split (both cached through the one training loop). The reward of a sample
   for condition c is the classifier's probability of c.
2. HyperAlign (step-wise) and a static LoRA on the same target layers ("reward fine-tuning")
   train the same number of steps on the same objective, backpropagating through the whole
   sampling chain: ``−mean reward + λ·mean_t ‖ε_adapted − ε_base‖²`` (the regulariser toward
   the base model is ours [recon]; the paper's L_G is unknown).
3. Every row samples the same conditions (each class ``per_class`` times) with the same seed:
   mean reward, diversity (mean pairwise RMS pixel distance of the samples of one class,
   averaged over classes) and CPU seconds of sampling. Best-of-N draws N samples per
   condition and keeps the one the reward prefers (its cost is N base samples).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters import inject, merge_adapters
from splice.bench.domains.common import cached_pretrain
from splice.bench.domains.common import train as train_loop
from splice.domains.backbones.ddpm import DDPMConfig, Denoiser, Eps, ddpm_loss, sample
from splice.domains.backbones.reward import RewardClassifier, reward
from splice.domains.hyperalign import TARGETS, HyperAlign

__all__ = ["DiffusionBench", "evaluate", "pretrain_ddpm", "run_diffusion"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class DiffusionBench:
    pretrain_steps: int = 1500
    reward_steps: int = 400
    align_steps: int = 100
    batch: int = 16
    sample_steps: int = 10
    lam: float = 1.0
    lr: float = 1e-3
    atoms: int = 4
    rank: int = 4
    ft_rank: int = 16
    per_class: int = 20
    best_of: tuple[int, ...] = (2, 3, 4)
    seed: int = 0


def _digits(seed: int):
    from splice.data.registry import TASKS, Caps, load_task

    data = load_task(TASKS.get("mnist_5k"), Caps(train=4000, val=250, test=750), seed)
    to = lambda s: (torch.from_numpy(s.x).float() / 127.5 - 1, torch.from_numpy(s.y))  # noqa: E731
    return to(data.train), to(data.test)


def pretrain_ddpm(b: DiffusionBench, log: Log = print) -> tuple[Denoiser, RewardClassifier, dict]:
    """The denoiser and the reward classifier (cached); returns them and their facts."""
    (x, y), (xt, yt) = _digits(b.seed)
    cfg = DDPMConfig()
    torch.manual_seed(b.seed)

    def fit_ddpm(model: nn.Module) -> dict:
        g = torch.Generator().manual_seed(b.seed)

        def loss(i: int) -> tuple[Tensor, int]:
            idx = torch.randint(len(y), (64,), generator=g)
            return ddpm_loss(model, x[idx], y[idx], g), 64

        state = train_loop(model, loss, b.pretrain_steps, 1e-3, weight_decay=0.0)
        log(f"ddpm: {b.pretrain_steps} steps in {state.seconds:.0f}s, loss {state.history[-1]:.3f}")
        return {"seconds": state.seconds, "loss": state.history[-1]}

    def fit_reward(model: nn.Module) -> dict:
        g = torch.Generator().manual_seed(b.seed)

        def loss(i: int) -> tuple[Tensor, int]:
            idx = torch.randint(len(y), (64,), generator=g)
            return F.cross_entropy(model(x[idx]), y[idx]), 64

        state = train_loop(model, loss, b.reward_steps, 2e-3)
        with torch.no_grad():
            acc = float((model(xt).argmax(-1) == yt).float().mean())
        log(f"reward classifier: test accuracy {acc:.3f} in {state.seconds:.0f}s")
        return {"seconds": state.seconds, "accuracy": acc}

    key = {"cfg": cfg.to_dict(), "steps": b.pretrain_steps, "seed": b.seed}
    ddpm, facts = cached_pretrain("ddpm", key, Denoiser(cfg), fit_ddpm)
    key = {"steps": b.reward_steps, "seed": b.seed}
    clf, rfacts = cached_pretrain("reward-cnn", key, RewardClassifier(), fit_reward)
    for m in (ddpm, clf):
        m.eval().requires_grad_(False)
    return ddpm, clf, {"ddpm": facts, "reward": rfacts}


def _plain(model: Denoiser) -> Eps:
    return lambda x, t, c, i: model(x, t, c)


def align(
    eps: Callable[[], Eps], model: nn.Module, base: Denoiser, clf: RewardClassifier,
    b: DiffusionBench, what: str, log: Log,
) -> dict:  # fmt: skip
    """Train ``model``'s trainable parameters on −reward + λ·‖ε − ε_base‖² through sampling."""
    g = torch.Generator().manual_seed(b.seed + 7)

    def loss(i: int) -> tuple[Tensor, int]:
        c = torch.randint(10, (b.batch,), generator=g)
        f, penalties = eps(), []

        def regularised(x: Tensor, t: Tensor, c: Tensor, step: int) -> Tensor:
            e = f(x, t, c, step)
            with torch.no_grad():
                ref = base(x, t, c)
            penalties.append((e - ref).square().mean())
            return e

        x0 = sample(regularised, base.alpha_bar, c, b.sample_steps, g)
        r = reward(clf, x0, c).mean()
        return -r + b.lam * torch.stack(penalties).mean(), b.batch

    state = train_loop(model, loss, b.align_steps, b.lr, weight_decay=0.0, warmup=0.1)
    log(f"{what}: {b.align_steps} steps in {state.seconds:.0f}s, loss {state.history[-1]:.3f}")
    return {"train_seconds": state.seconds, "loss": state.history[-1]}


def _diversity(x: Tensor, c: Tensor) -> float:
    out = []
    for k in c.unique():
        s = x[c == k].flatten(1)
        d = torch.cdist(s, s) / s.shape[1] ** 0.5
        n = len(s)
        out.append(float(d.sum() / (n * (n - 1))))
    return sum(out) / len(out)


@torch.no_grad()
def evaluate(eps: Eps, base: Denoiser, clf: RewardClassifier, b: DiffusionBench, n: int = 1):
    """Mean reward, diversity and sampling CPU seconds; best of ``n`` samples per condition."""
    c = torch.arange(10).repeat_interleave(b.per_class)
    g = torch.Generator().manual_seed(b.seed + 1000)
    start = time.process_time()
    x = sample(eps, base.alpha_bar, c.repeat(n), b.sample_steps, g)
    seconds = time.process_time() - start
    r = reward(clf, x, c.repeat(n)).reshape(n, -1)
    pick = r.argmax(0)
    best = x.reshape(n, len(c), *x.shape[1:])[pick, torch.arange(len(c))]
    return {
        "reward": float(r.max(0).values.mean()),
        "diversity": _diversity(best, c),
        "sample_seconds": seconds,
    }


def run_diffusion(b: DiffusionBench = DiffusionBench(), log: Log = print) -> dict:
    """Every row of the benchmark (see the module docstring) and the settings."""
    base, clf, facts = pretrain_ddpm(b, log)
    rows: dict[str, dict] = {"base": {"params": 0} | evaluate(_plain(base), base, clf, b)}
    log(f"base: {rows['base']}")
    for n in b.best_of:
        rows[f"best_of_{n}"] = {"params": 0} | evaluate(_plain(base), base, clf, b, n)
        log(f"best-of-{n}: {rows[f'best_of_{n}']}")

    torch.manual_seed(b.seed)
    tuned = inject(copy.deepcopy(base), "lora", list(TARGETS), r=b.ft_rank, alpha=float(b.ft_rank))
    rows["reward_ft"] = {"params": _trainable(tuned)}
    rows["reward_ft"] |= align(lambda: _plain(tuned), tuned, base, clf, b, "reward FT", log)
    merge_adapters(tuned)  # a static LoRA samples at the base model's cost once merged
    rows["reward_ft"] |= evaluate(_plain(tuned), base, clf, b)
    log(f"reward fine-tuning: {rows['reward_ft']}")

    torch.manual_seed(b.seed)
    ha = HyperAlign(copy.deepcopy(base), atoms=b.atoms, r=b.rank)
    ha.denoiser.train()
    rows["hyperalign_S"] = {"params": _trainable(ha)}
    rows["hyperalign_S"] |= align(ha.eps, ha, base, clf, b, "HyperAlign", log)
    for variant, letter in (("step", "S"), ("piece", "P"), ("once", "I")):
        ha.variant = variant
        name = f"hyperalign_{letter}"
        rows[name] = rows.get(name, {"params": rows["hyperalign_S"]["params"]})
        rows[name] |= evaluate(ha.eps(), base, clf, b)
        log(f"{name}: {rows[name]}")
    return {"settings": asdict(b), "pretrain": facts, "rows": rows}


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
