"""CMA-ES over a recipe's parameters (Optuna's ``CmaEsSampler``, backed by the ``cmaes``
package), each trial a merge plus a fitness call, run as Ray tasks or in this process.

The study lives in ``storage/study.log`` (Optuna's journal storage): rerunning the same
command resumes it — finished trials are kept, trials a kill left running are marked failed,
and CMA-ES picks up its state from the recorded generations — until ``trials`` trials have
completed. With Ray every generation (``popsize`` trials) is asked at once and run in
parallel; in-process, trials are asked, run and told one at a time. After each a progress
row is printed and ``storage/best.yml`` (the recipe with the best values)
is rewritten. A trial's merged model is deleted once scored.

Ray: ``executor="ray"`` starts a local Ray (or joins ``address``, e.g. ``ray://head:10001``)
and runs each trial as a task with ``num_cpus=cpus_per_trial``; Ray is an optional extra
(``pip install splice[evolve]``). ``executor="local"`` runs trials one by one here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.merge.evolve.genome import apply, load_genome

__all__ = ["evolve", "load_scorer"]

Progress = Callable[[dict[str, Any]], None]


def load_scorer(spec: str) -> Callable[[Path], float]:
    """``module:function`` or ``path/to/file.py:function`` → the function (model dir → score)."""
    mod_name, _, fn = spec.rpartition(":")
    if not mod_name or not fn:
        raise SpliceError(f"scorer {spec!r}", fix="write module:function or file.py:function")
    try:
        if mod_name.endswith(".py"):
            s = importlib.util.spec_from_file_location("splice_evolve_scorer", mod_name)
            if s is None or s.loader is None or not Path(mod_name).is_file():
                raise ImportError(mod_name)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
        return getattr(module, fn)
    except (ImportError, AttributeError) as e:
        raise SpliceError(f"cannot load scorer {spec!r}: {e}", fix="check the name") from None


Scorer = str | Callable[[Path], float]
"""``module:function``, ``file.py:function``, or a picklable callable (model dir → float)."""


def _trial(raw: dict[str, Any], out: str, scorer: Scorer, env: dict[str, str]) -> float:
    """One trial: merge ``raw`` into ``out``, score it, delete it (runs in a Ray worker too)."""
    for key, value in env.items():
        if key == "PYTHONPATH":
            for p in reversed(value.split(":")):
                if p and p not in sys.path:
                    sys.path.insert(0, p)
    from splice.merge import merge

    try:
        merge(raw, out, force=True, progress=False, checksums=False)
        fn = load_scorer(scorer) if isinstance(scorer, str) else scorer
        return float(fn(Path(out)))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _runner(executor: str, address: str | None, cpus: float) -> Callable[..., list[Any]]:
    """``run(list of trial arg tuples) -> list of float or Exception``."""
    if executor == "local":

        def run_local(jobs: list[tuple]) -> list[Any]:
            out: list[Any] = []
            for job in jobs:
                try:
                    out.append(_trial(*job))
                except Exception as e:  # a failed trial is recorded, the search goes on
                    out.append(e)
            return out

        return run_local
    try:
        import ray
    except ImportError:
        raise SpliceError(
            "executor ray needs Ray",
            fix="pip install 'splice[evolve]', or pass --executor local",
        ) from None
    if not ray.is_initialized():
        ray.init(
            address=address,
            ignore_reinit_error=True,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    remote = ray.remote(num_cpus=cpus)(_trial)

    def run_ray(jobs: list[tuple]) -> list[Any]:
        futures = [remote.remote(*job) for job in jobs]
        out: list[Any] = []
        for f in futures:
            try:
                out.append(ray.get(f))
            except Exception as e:  # RayTaskError wraps the trial's own exception
                out.append(e)
        return out

    return run_ray


def _study(storage: Path, genome: Any) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage.mkdir(parents=True, exist_ok=True)
    backend = JournalStorage(JournalFileBackend(str(storage / "study.log")))
    sampler = optuna.samplers.CmaEsSampler(seed=genome.seed, popsize=genome.popsize)
    study = optuna.create_study(
        study_name="splice-evolve",
        storage=backend,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left running by a kill
    return study


def evolve(
    genome_path: str | Path,
    storage: str | Path,
    scorer: Scorer,
    *,
    executor: str = "ray",
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) the search of ``genome_path`` in ``storage``; return the summary:
    completed and failed trials, the best fitness, its values and ``best.yml``.

    Raises:
        SpliceError: a bad genome or recipe, an unloadable scorer, Ray missing for
            ``executor="ray"``, every trial of a generation failing (the first error).
    """
    import optuna
    import yaml

    genome, raw = load_genome(genome_path)
    if isinstance(scorer, str):
        load_scorer(scorer)  # fail before the first merge
    if executor not in ("ray", "local"):
        raise SpliceError(f"executor {executor!r}", fix="use ray or local")
    storage = Path(storage)
    study = _study(storage, genome)
    dists = {d.path: optuna.distributions.FloatDistribution(d.low, d.high) for d in genome.search}
    run = _runner(executor, address, cpus_per_trial)
    env = {"PYTHONPATH": ":".join(p for p in sys.path if p)}
    complete = optuna.trial.TrialState.COMPLETE
    popsize = genome.popsize or 4 + int(3 * math.log(len(dists)))  # CMA-ES default
    batch = popsize if executor == "ray" else 1  # in-process: ask, run, tell one at a time
    best_path = storage / "best.yml"
    while (done := len(study.get_trials(states=(complete,)))) < genome.trials:
        start = time.perf_counter()
        asked = [study.ask(dists) for _ in range(min(batch, genome.trials - done))]
        jobs = [
            (apply(raw, genome, t.params), str(storage / "trials" / f"{t.number:05d}"), scorer, env)
            for t in asked
        ]
        results = run(jobs)
        errors = []
        for t, r in zip(asked, results, strict=True):
            if isinstance(r, Exception):
                study.tell(t, state=optuna.trial.TrialState.FAIL)
                errors.append(r)
            else:
                study.tell(t, r)
        if len(errors) == len(asked) and not any(
            t.state == complete for t in study.get_trials(deepcopy=False)
        ):
            raise SpliceError(f"the first trials all failed: {errors[0]}".splitlines()[0])
        best = study.best_trial
        best_path.write_text(yaml.safe_dump(apply(raw, genome, best.params), sort_keys=False))
        if progress is not None:
            for t, r in zip(asked, results, strict=True):
                progress(
                    {
                        "trial": t.number,
                        "params": t.params,
                        "fitness": None if isinstance(r, Exception) else r,
                        "error": str(r).splitlines()[0] if isinstance(r, Exception) else None,
                        "best": best.value,
                        "seconds": round((time.perf_counter() - start) / len(asked), 2),
                    }
                )
    trials = study.get_trials(deepcopy=False)
    best = study.best_trial
    summary = {
        "completed": sum(t.state == complete for t in trials),
        "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        "best_fitness": best.value,
        "best_params": best.params,
        "best_recipe": str(best_path),
    }
    (storage / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
