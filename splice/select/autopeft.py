"""AutoPEFT — multi-objective search over PEFT configurations (Zhou et al., TACL 2024; §15).

A configuration is a flat integer vector over a :class:`Space` (sizes in log₂ steps, one
leave-out bit per layer, §22.2 P12); :meth:`Space.encode`/:meth:`Space.decode` convert.
:func:`sappa` is the paper's serial + parallel + prefix space with its parameter-share formula
(:func:`sappa_share`), trained as the ``sappa`` adapter (:func:`sappa_options` gives its
options and layers, :func:`sappa_count` its exact trainable count); :func:`lora_space` is one
LoRA rank, which module groups and which layers, and holds the usual hand configurations
(LoRA r=8 on q,v; on every linear layer) as points.

:func:`search` maximises validation accuracy and minimises the parameter share with Optuna's
multi-objective TPE sampler instead of the paper's SAAS-GP + qNEHVI (BoTorch): Optuna is a
light pure-Python dependency, its TPE sampler is made for budgets of tens of trials, and its
SQLite storage in the study dir makes a search resumable — a study killed mid-way continues
from its finished trials. The budget is a number of trials and, optionally, minutes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import SpliceError

__all__ = [
    "Dim",
    "Space",
    "TrialResult",
    "lora_space",
    "open_study_dir",
    "pareto_front",
    "sappa",
    "sappa_count",
    "sappa_options",
    "sappa_share",
    "search",
    "size_from_log2",
]

SPACE_FILE = "space.json"
STUDY_FILE = "study.db"


@dataclass(frozen=True)
class Dim:
    """One integer coordinate ``low..high`` (a bit is 0..1)."""

    name: str
    low: int
    high: int


@dataclass(frozen=True)
class Space:
    """A named list of integer coordinates and the facts needed to read them (``meta``)."""

    name: str
    dims: tuple[Dim, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def encode(self, config: dict[str, int]) -> list[int]:
        """Configuration → flat vector in ``dims`` order.

        Raises:
            SpliceError: a missing or unknown key, or a value outside its range.
        """
        names = [d.name for d in self.dims]
        if set(config) != set(names):
            odd = sorted(set(config) ^ set(names))
            raise SpliceError(f"configuration keys differ from the {self.name} space at {odd[:3]}")
        for d in self.dims:
            if not d.low <= int(config[d.name]) <= d.high:
                raise SpliceError(f"{d.name}={config[d.name]} is outside {d.low}..{d.high}")
        return [int(config[n]) for n in names]

    def decode(self, vector: list[int]) -> dict[str, int]:
        """Flat vector → configuration (the inverse of :meth:`encode`)."""
        if len(vector) != len(self.dims):
            raise SpliceError(f"vector of {len(vector)} values for {len(self.dims)} dimensions")
        config = {d.name: int(v) for d, v in zip(self.dims, vector, strict=True)}
        self.encode(config)  # range check
        return config

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dims": [asdict(d) for d in self.dims], "meta": self.meta}


def size_from_log2(k: int, d: int) -> int:
    """Module size for reduction 2^k of width d: ⌊d/2^k⌋, 0 (disabled) once 2^k > d (§15)."""
    return 0 if 2**k > d else d // 2**k


def sappa(n_layers: int, d: int) -> Space:
    """The paper's space: serial/parallel/prefix reductions 0..10 and a leave-out bit per layer."""
    kinds = [Dim(f"log2_reduction_{k}", 0, 10) for k in ("serial", "parallel", "prefix")]
    bits = [Dim(f"leave_out_{i}", 0, 1) for i in range(n_layers)]
    return Space("sappa", (*kinds, *bits), {"n_layers": n_layers, "d": d})


def sappa_share(space: Space, config: dict[str, int], total: int) -> float:
    """Parameter share in %: Σ over active layers of 2d·(s_ser + s_par + l_pre), over |θ|."""
    d, n_layers = space.meta["d"], space.meta["n_layers"]
    sizes = sum(
        size_from_log2(config[f"log2_reduction_{k}"], d) for k in ("serial", "parallel", "prefix")
    )
    active = sum(1 for i in range(n_layers) if not config[f"leave_out_{i}"])
    return 100.0 * active * 2 * d * sizes / total


def sappa_options(space: Space, config: dict[str, int]) -> tuple[dict[str, int], list[int]]:
    """The ``sappa`` adapter's options (``serial``, ``parallel``, ``prefix`` sizes; 0 = the
    module is absent) and the kept layers of a configuration of :func:`sappa`."""
    d, n_layers = space.meta["d"], space.meta["n_layers"]
    sizes = {k: size_from_log2(config[f"log2_reduction_{k}"], d)
             for k in ("serial", "parallel", "prefix")}  # fmt: skip
    return sizes, [i for i in range(n_layers) if not config[f"leave_out_{i}"]]


def sappa_count(space: Space, config: dict[str, int]) -> int:
    """Trainable parameters of the ``sappa`` adapter for ``config`` on a model of width d:
    :func:`sappa_share`'s ``2d·(s_ser + s_par + l_pre)`` per kept layer plus each present
    bottleneck's biases (``s + d``)."""
    d = space.meta["d"]
    sizes, layers = sappa_options(space, config)
    biases = sum(s + d for k, s in sizes.items() if k != "prefix" and s)
    return len(layers) * (2 * d * sum(sizes.values()) + biases)


def lora_space(n_layers: int, groups: dict[str, list[str]], max_log2_rank: int = 5) -> Space:
    """One LoRA rank 2^k (k ≤ ``max_log2_rank``), a use bit per module group (name → target
    suffixes) and a leave-out bit per layer: the configurations ``splice train`` runs."""
    dims = [Dim("log2_rank", 0, max_log2_rank)]
    dims += [Dim(f"use_{g}", 0, 1) for g in groups]
    dims += [Dim(f"leave_out_{i}", 0, 1) for i in range(n_layers)]
    return Space("lora", tuple(dims), {"n_layers": n_layers, "groups": groups})


@dataclass
class TrialResult:
    number: int
    config: dict[str, int]
    accuracy: float
    share: float


def pareto_front(results: list[TrialResult]) -> list[TrialResult]:
    """Trials no other trial dominates (accuracy ≥ and share ≤, one of them strictly), by share."""

    def dominates(a: TrialResult, b: TrialResult) -> bool:
        better = a.accuracy > b.accuracy or a.share < b.share
        return a.accuracy >= b.accuracy and a.share <= b.share and better

    front = [r for r in results if not any(dominates(o, r) for o in results)]
    return sorted(front, key=lambda r: (r.share, -r.accuracy, r.number))


def open_study_dir(study_dir: str | Path, space: Space) -> None:
    """Make ``study_dir`` for ``space``, or check that it was made for it.

    Raises:
        SpliceError: the dir holds a study of another space (naming both).
    """
    study_dir = Path(study_dir)
    path = study_dir / SPACE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != space.to_json():
            raise SpliceError(
                f"the study dir was made for another search space ({saved.get('name')!r}, "
                f"{len(saved.get('dims', []))} dims; this search: {space.name!r}, "
                f"{len(space.dims)} dims)",
                where=str(study_dir),
                fix=f"use a new --study dir, or the settings it was made with (--space "
                f"{saved.get('name')})",
            )
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(space.to_json(), indent=2) + "\n")


def search(
    space: Space,
    evaluate: Callable[[dict[str, int]], tuple[float, float] | None],
    study_dir: str | Path,
    *,
    trials: int,
    minutes: float | None = None,
    seed: int = 0,
    first: list[dict[str, int]] = (),
) -> list[TrialResult]:
    """Run the search until ``trials`` trials are finished in ``study_dir`` (or ``minutes``
    pass); returns every finished trial. ``evaluate(config)`` gives (accuracy, share %), or
    None for a configuration that cannot be trained; a configuration the sampler proposes
    again reuses its first result (a trial of the budget, no training). ``first``
    configurations (e.g. the hand baselines) are evaluated first in a new study.

    Raises:
        SpliceError: ``trials`` < 1, or the study dir belongs to another space.
    """
    import optuna
    from optuna.trial import TrialState

    if trials < 1:
        raise SpliceError(f"trial budget {trials} must be ≥ 1")
    study_dir = Path(study_dir)
    open_study_dir(study_dir, space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the heartbeat marks a trial of a killed run as failed once it stops beating: it is
    # not counted, and the run continues from the finished ones
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 4–5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{(study_dir / STUDY_FILE).resolve()}",
            heartbeat_interval=30,
            grace_period=60,
        )
    study = optuna.create_study(
        study_name="autopeft", storage=storage, load_if_exists=True,
        directions=["maximize", "minimize"],
    )  # fmt: skip
    finished = len(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    )
    new = not study.get_trials(deepcopy=False)
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + finished, n_startup_trials=min(10, trials)
    )
    if new:
        for config in first:
            names = [d.name for d in space.dims]
            study.enqueue_trial(dict(zip(names, space.encode(config), strict=True)))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        config = {d.name: trial.suggest_int(d.name, d.low, d.high) for d in space.dims}
        for old in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if old.params == config:  # the sampler proposed a finished configuration again
                return tuple(old.values)
        result = evaluate(config)
        if result is None:
            raise optuna.TrialPruned()
        return result

    left = trials - finished
    if left > 0:
        study.optimize(objective, n_trials=left, timeout=None if minutes is None else minutes * 60)
    return [
        TrialResult(t.number, dict(t.params), t.values[0], t.values[1])
        for t in study.get_trials(states=(TrialState.COMPLETE,))
    ]
