"""Bench fitness for ``splice evolve --bench``: a merged model scored by the benchmark.

:class:`BenchFitness` names text tasks (packaged benchmark tasks or local CSV/JSONL files) and
the bench settings they are fine-tuned with (the quick profile's by default). :meth:`prepare`
fine-tunes each task from the bench's text backbone exactly as ``splice bench`` does (cached
in the bench cache) and writes the models a recipe merges: ``DIR/base`` (the backbone) and
``DIR/<task>`` (backbone + that task's change), Hugging Face dirs with the backbone's config
and tokenizer. Calling the fitness on a merged model dir returns the mean, over the tasks, of
the accuracy on each task's **validation** split (never test), each task classified by the
head of its own fine-tune on the merged backbone's pooled features — the bench's own
evaluation. An instance is a small picklable value: a Ray worker loads the backbone, splits
and heads once per process and reuses them for every trial it runs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import SpliceError

__all__ = ["BenchFitness"]


@dataclass(frozen=True)
class BenchFitness:
    """Mean validation accuracy of the bench tasks ``tasks`` (see module docstring).

    ``settings``: :class:`splice.bench.runner.BenchConfig` fields (``text_model``, ``caps``,
    ``max_len``, ``split_seed``, ``train`` as a dict of ``FinetuneConfig`` fields), over the
    quick profile's; ``seed`` is the fine-tuning seed.
    """

    tasks: tuple[str, ...]
    settings: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    @classmethod
    def of(cls, tasks: str | list[str], seed: int = 0, **settings: Any) -> BenchFitness:
        """``tasks``: a profile name (``quick``: its tasks), or task names / files, or a
        comma-separated string of them."""
        from splice.bench.runner import PROFILES

        if isinstance(tasks, str):
            names = PROFILES[tasks].tasks if tasks in PROFILES else tasks.split(",")
        else:
            names = tasks
        names = tuple(t.strip() for t in names if t.strip())
        if not names:
            raise SpliceError("no bench tasks given", fix="name tasks, e.g. --bench quick")
        items = tuple(sorted((k, _frozen(v)) for k, v in settings.items()))
        return cls(names, items, seed)

    def config(self) -> Any:
        from splice.bench.finetune import FinetuneConfig
        from splice.bench.runner import PROFILES

        update = dict(self.settings)
        if "train" in update:
            update["train"] = FinetuneConfig(**dict(update["train"]))
        return PROFILES["quick"].model_copy(update={**update, "tasks": self.tasks})

    def prepare(self, out: str | Path, log: Any = None) -> dict[str, Path]:
        """Fine-tune (or load from the cache) every task; write ``out/base`` and
        ``out/<task>`` unless present. Returns {name: dir}, ``base`` first."""
        from splice.bench.finetune import apply_deltas
        from splice.io import CheckpointWriter, atomic_dir

        suite = _suite(self)
        out = Path(out)
        module = suite.encoder.module
        base = {n: t.detach().cpu() for n, t in module.state_dict().items()}
        dirs = {"base": out / "base", **{t: out / _dir_name(t) for t in suite.runs}}
        aux = out / ".files"
        if not (aux / "config.json").is_file():
            with atomic_dir(aux) as tmp:
                module.config.save_pretrained(str(tmp))
                suite.encoder.tokenizer.save_pretrained(str(tmp))  # type: ignore[attr-defined]
        for name, path in dirs.items():
            if (path / "config.json").is_file():
                continue
            tensors = (
                base if name == "base" else {**base, **apply_deltas(base, suite.runs[name].deltas)}
            )
            with CheckpointWriter(path, force=True, copy_files_from=aux) as w:
                for n, t in tensors.items():
                    w.write(n, t.contiguous())
            if log is not None:
                log(f"wrote {path}")
        return dirs

    def scores(self, model_dir: str | Path) -> dict[str, float]:
        """Validation accuracy per task of the backbone in ``model_dir``."""
        from splice.io import open_checkpoint

        suite = _suite(self)
        ckpt = open_checkpoint(model_dir)
        wanted = dict(suite.encoder.module.state_dict())
        weights = {n: ckpt[n].to(wanted[n].dtype) for n in ckpt.names() if n in wanted}
        if not weights:
            raise SpliceError(
                "the model has none of the bench backbone's tensors",
                where=str(model_dir),
                fix="merge the models BenchFitness.prepare wrote (same names as the backbone)",
            )
        return suite.acc(weights, split="val")

    def __call__(self, model_dir: str | Path) -> float:
        acc = self.scores(model_dir)
        return sum(acc.values()) / len(acc)


def _frozen(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    return tuple(v) if isinstance(v, list) else v


def _dir_name(task: str) -> str:
    """A task's model dir name: the task name, or a local file's stem."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(task).stem if "/" in task else task)


@functools.lru_cache(maxsize=2)
def _suite(fitness: BenchFitness) -> Any:
    """The backbone, splits and fine-tuned heads, once per process."""
    from splice.bench.finetune import finetune_cached
    from splice.bench.runner import load_backbone
    from splice.bench.suite import Suite
    from splice.data.local import resolve_task

    cfg = fitness.config()
    tasks = [resolve_task(t) for t in fitness.tasks]
    if any(t.modality != "text" for t in tasks):
        raise SpliceError(
            "bench fitness takes text tasks only",
            where=",".join(t.name for t in tasks if t.modality != "text"),
            fix="the merged model must be the text backbone; drop the image tasks",
        )
    g = load_backbone(cfg, "text", tasks)
    suite = Suite(g.encoder, g.data, g.val, g.test, batch_size=cfg.eval_batch_size)
    with torch.inference_mode(False):
        for name, data in g.data.items():
            suite.runs[name], _ = finetune_cached(g.encoder, data, cfg.train, fitness.seed)
    return suite
