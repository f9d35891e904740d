"""Learned-merge recipes: the ``splice merge`` YAML with a ``data:`` section.

::

    method: adamerging                  # a learned method (splice.merge.learned)
    models: [rt_sentiment, tweet_sentiment, ./my_task.csv]   # bench tasks or local files
    params: {mode: layer, steps: 200}   # the method's hyperparameters (validated)
    data:
      split: val                        # examples the method sees: train or val, never test
      samples: 200                      # per task
      seed: 0                           # the split's seed
    finetune: {steps: 120}              # how each expert is fine-tuned (bench TrainConfig)
    seed: 0

Each ``models`` entry is a task: a packaged benchmark task or a local CSV/JSONL (``text,label``)
or image folder. Its expert is fine-tuned from the benchmark's backbone (LoRA by default,
cached), exactly as ``splice bench`` does; the method then merges the experts' deltas with the
task's ``data.split`` examples and the experts' heads. The output dir holds the merged
backbone (an HF dir for text), ``heads.safetensors`` and ``splice-learned.json`` (recipe,
coefficients, objective history, validation accuracy).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splice.errors import SpliceError
from splice.merge.learned._base import learned

__all__ = ["LearnedRecipe", "is_learned_recipe", "load_learned_recipe", "run_recipe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Strict):
    split: Literal["train", "val"] = Field("val", description="split the method sees")
    samples: int = Field(200, ge=1, description="examples per task")
    seed: int = Field(0, description="seed of the stratified train/val/test split")
    max_len: int = Field(32, ge=1, description="text: tokens per example")
    image_size: int = Field(32, ge=8, description="vision: input side in pixels")
    text_model: str = Field("minilm", description="'minilm' or a local BERT-style model dir")


class LearnedRecipe(_Strict):
    method: str = Field(description="a learned merge method")
    models: list[str] = Field(min_length=1, description="bench task names or local task files")
    params: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    data: DataSection = Field(default_factory=DataSection)
    finetune: dict[str, Any] = Field(default_factory=dict, description="bench TrainConfig")
    seed: int = Field(0, description="fine-tuning and method seed")


def _raw(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return dict(source), "recipe"
    path = Path(source)
    try:
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpliceError("recipe file not found", where=str(path)) from None
    except yaml.YAMLError as e:
        raise SpliceError(f"not valid YAML: {e}".splitlines()[0], where=str(path)) from None
    if not isinstance(raw, dict):
        raise SpliceError("a recipe is a YAML mapping", where=str(path))
    return raw, str(path)


def is_learned_recipe(source: str | Path | Mapping[str, Any]) -> bool:
    """True when the recipe has a ``data:`` section or names a learned method."""
    raw, _ = _raw(source)
    return "data" in raw or raw.get("method") in learned.names()


def load_learned_recipe(source: str | Path | Mapping[str, Any]) -> LearnedRecipe:
    """Read and validate a learned-merge recipe (unknown keys and parameters are errors)."""
    raw, where = _raw(source)
    try:
        recipe = LearnedRecipe.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SpliceError(f"{err['msg']}", where=f"{where}: {loc or 'recipe'}") from None
    method = learned.get(recipe.method)
    method.params(recipe.params)
    from splice.bench.train import TrainConfig

    try:
        TrainConfig(**recipe.finetune)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpliceError(f"finetune.{err['loc'][0]}: {err['msg']}", where=where) from None
    return recipe


def run_recipe(
    recipe: str | Path | Mapping[str, Any] | LearnedRecipe,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune (cached) the recipe's experts, run its learned merge, write ``out``.

    Returns a summary: method, tasks, seconds, the method's info and the merged model's
    accuracy on each task's ``data.split`` examples (test data are never touched).
    """
    from splice.bench.data import Caps, load_task
    from splice.bench.local import resolve_task
    from splice.bench.models import load_encoder
    from splice.bench.train import TrainConfig, finetune_cached

    if not isinstance(recipe, LearnedRecipe):
        recipe = load_learned_recipe(recipe)
    method = learned.get(recipe.method)
    params = method.params(recipe.params)
    task_objs = [resolve_task(m) for m in recipe.models]
    if len({t.modality for t in task_objs}) != 1:
        raise SpliceError("a learned recipe merges tasks of one modality (text or image)")
    names = [t.name for t in task_objs]
    if len(set(names)) != len(names):
        raise SpliceError(f"a task appears twice in models: {names}")
    if out is not None and Path(out).exists() and not force:
        raise SpliceError("output exists", where=str(out), fix="pass --force to replace it")
    d = recipe.data
    caps = Caps(train=max(Caps().train, d.samples), val=max(Caps().val, d.samples))
    data = {t.name: load_task(t, caps, d.seed) for t in task_objs}
    encoder = load_encoder(
        task_objs[0].modality,
        text_model=d.text_model,
        max_len=d.max_len,
        image_size=d.image_size,
        device=device,
    )
    train_cfg = TrainConfig(**recipe.finetune)
    runs = {n: finetune_cached(encoder, td, train_cfg, recipe.seed)[0] for n, td in data.items()}
    labels = method.needs_labels(params)
    examples: dict[str, Any] = {}
    for n, td in data.items():
        split = getattr(td, d.split)
        k = min(d.samples, len(split))
        inputs = encoder.prepare(split.x[:k])
        examples[n] = (inputs, np.asarray(split.y[:k])) if labels else inputs
    start = time.perf_counter()
    result = method.run(
        encoder.module,
        {n: r.deltas for n, r in runs.items()},
        examples,
        params=params.model_dump(),
        heads={n: r.head for n, r in runs.items()},
        forward=lambda module, batch: encoder.features(batch, module=module),
        rows=(lambda b: b["attention_mask"]) if encoder.modality == "text" else None,
        seed=recipe.seed,
        device=device,
        progress=progress,
    )
    if method.continual:
        *_, result = result
    seconds = time.perf_counter() - start
    acc = _accuracy(encoder, runs, data, d, result.weights)
    summary = {
        "method": recipe.method,
        "tasks": names,
        "seconds": round(seconds, 3),
        f"{d.split}_accuracy": acc,
        "info": _jsonable(result.info),
    }
    if out is not None:
        _write(out, encoder, runs, result, recipe, summary, force)
        summary["out"] = str(out)
    return summary


@torch.no_grad()
def _accuracy(
    encoder: Any, runs: Mapping[str, Any], data: Mapping[str, Any], d: DataSection, weights: Any
) -> dict[str, float]:
    out = {}
    dev = next(encoder.module.parameters()).device
    for n, td in data.items():
        split = getattr(td, d.split)
        k = min(d.samples, len(split))
        prepared = encoder.prepare(split.x[:k])
        preds = []
        for s in range(0, k, 128):
            idx = np.arange(s, min(s + 128, k))
            feats = encoder.features(prepared.batch(idx, dev), weights)
            preds.append(runs[n].head(feats).argmax(-1).cpu())
        out[n] = round(float((torch.cat(preds).numpy() == split.y[:k]).mean()), 4)
    return out


def _jsonable(info: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(
        json.dumps(dict(info), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _write(
    out: str | Path,
    encoder: Any,
    runs: Mapping[str, Any],
    result: Any,
    recipe: LearnedRecipe,
    summary: Mapping[str, Any],
    force: bool,
) -> None:
    from safetensors.torch import save

    from splice.io import CheckpointWriter

    model_dir = getattr(getattr(encoder.module, "config", None), "_name_or_path", None)
    src = Path(model_dir) if model_dir and Path(model_dir).is_dir() else None
    heads = {}
    for n, r in runs.items():
        heads[f"{n}.weight"] = r.head.weight.contiguous()
        heads[f"{n}.bias"] = r.head.bias.contiguous()
    coef = getattr(result, "coefficients", None)
    record = {
        "recipe": recipe.model_dump(mode="json"),
        **dict(summary),
        "coefficients": None if coef is None else coef.tolist(),
        "history": getattr(result, "history", []),
    }
    meta = {"splice.method": recipe.method, "splice.recipe": json.dumps(recipe.model_dump())}
    with CheckpointWriter(out, force=force, copy_files_from=src, metadata=meta) as w:
        for name, t in encoder.module.state_dict().items():
            w.write(name, result.weights.get(name, t))
        w.add_file("heads.safetensors", save(heads))
        w.add_file("splice-learned.json", json.dumps(record, indent=2) + "\n")
