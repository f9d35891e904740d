"""Learned-merge recipes: the ``splice merge`` YAML with a ``data:`` section.

Checkpoints (``base`` given): fine-tuned Hugging Face sequence-classification dirs, each with a
data file (CSV/JSONL with a ``text`` column; ``label`` optional, needed by aTLAS ``ce``)::

    method: adamerging
    base: ./bert-base                   # the pretrained backbone (HF dir)
    models:
      - {path: ./ft-sst2, data: ./sst2-val.csv}
      - {path: ./ft-mrpc, data: ./mrpc-val.jsonl}
    params: {steps: 200}                # the method's hyperparameters (validated)
    data: {samples: 200, max_len: 64}   # examples per task, tokens per example

The backbone tensors are merged; each fine-tune keeps its own classifier (the tensors the base
lacks). The output dir holds the merged backbone in the base's format and names, with its
config and tokenizer files, ``heads.safetensors`` (``<task>/<tensor>``) and
``splice-learned.json`` (recipe, coefficients, objective history, accuracy on the data given).

Benchmark tasks (no ``base``): each ``models`` entry is a packaged benchmark task or a local
CSV/JSONL (``text,label``) / image folder; its expert is fine-tuned from the benchmark backbone
(LoRA, cached) exactly as ``splice bench`` does, and the method sees ``data.samples`` examples
of the task's ``data.split`` (train or val — never test)::

    method: lot
    models: [rt_sentiment, tweet_sentiment, ./my_task.csv]
    data: {split: val, samples: 200}
    finetune: {steps: 120}
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from splice._schema import Strict, validate
from splice.errors import SpliceError
from splice.merge.learned._base import learned
from splice.merge.recipe import is_learned_recipe
from splice.merge.recipe.settings import recipe_error

__all__ = ["LearnedRecipe", "is_learned_recipe", "load_learned_recipe", "run_recipe"]


class DataSection(Strict):
    samples: int = Field(200, ge=1, description="examples per task")
    split: Literal["train", "val"] = Field("val", description="benchmark tasks: split to use")
    seed: int = Field(0, description="seed of the benchmark split / of the file sample")
    max_len: int = Field(32, ge=1, description="text: tokens per example")
    image_size: int = Field(32, ge=8, description="benchmark image tasks: input side")
    text_model: str = Field("minilm", description="benchmark text backbone: 'minilm' or a dir")


class ModelEntry(Strict):
    path: str = Field(description="fine-tuned HF sequence-classification dir")
    data: str = Field(description="CSV/JSONL of this task's examples (text[, label])")


class LearnedRecipe(Strict):
    method: str = Field(description="a learned merge method")
    base: str | None = Field(None, description="pretrained HF dir (checkpoint form)")
    models: list[str | ModelEntry] = Field(min_length=1, description="tasks or fine-tunes")
    params: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    data: DataSection = Field(default_factory=DataSection)
    finetune: dict[str, Any] = Field(default_factory=dict, description="bench FinetuneConfig")
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


def load_learned_recipe(source: str | Path | Mapping[str, Any]) -> LearnedRecipe:
    """Read and validate a learned-merge recipe (unknown keys and parameters are errors)."""
    raw, where = _raw(source)
    try:
        recipe = LearnedRecipe.model_validate(raw)
    except ValidationError as e:
        raise recipe_error(e, where, LearnedRecipe, DataSection, ModelEntry) from None
    learned.get(recipe.method).params(recipe.params)
    hf = recipe.base is not None
    if any(isinstance(m, str) == hf for m in recipe.models):
        raise SpliceError(
            "models must all be {path, data} entries with a base, or task names without one",
            where=f"{where}: models",
        )
    if hf and recipe.finetune:
        raise SpliceError("finetune applies to benchmark tasks only", where=f"{where}: finetune")
    if not hf:
        from splice.bench.finetune import FinetuneConfig

        validate(FinetuneConfig, recipe.finetune, prefix="finetune.", where=where)
    return recipe


@dataclass
class _Setup:
    """What a learned method needs, plus how to score and write the result."""

    tasks: list[str]
    module: nn.Module
    deltas: dict[str, dict[str, Any]]
    examples: dict[str, Any]  # {task: prepared inputs}
    labels: dict[str, np.ndarray | None]
    heads: dict[str, Any]
    forward: Callable[[nn.Module, Any], Tensor]
    rows: Callable[[Any], Tensor] | None
    write: Callable[[Any, Mapping[str, Tensor]], None]  # (writer, merged weights)
    copy_from: Path | None


def run_recipe(
    recipe: str | Path | Mapping[str, Any] | LearnedRecipe,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a learned-merge recipe; write ``out`` if given.

    Returns a summary: method, tasks, seconds of the merge, the method's info and the merged
    model's accuracy on the examples it was given (where labels exist).
    """
    if not isinstance(recipe, LearnedRecipe):
        recipe = load_learned_recipe(recipe)
    if out is not None and Path(out).exists() and not force:
        raise SpliceError("output exists", where=str(out), fix="pass --force to replace it")
    method = learned.get(recipe.method)
    params = method.params(recipe.params)
    labeled = method.needs_labels(params)
    s = _checkpoints(recipe, device) if recipe.base else _bench_tasks(recipe, device)
    if labeled and any(y is None for y in s.labels.values()):
        raise SpliceError(f"{recipe.method} with these params needs labels in every data file")
    data = {
        t: (s.examples[t], s.labels[t]) if labeled else s.examples[t] for t in s.tasks
    }  # fmt: skip
    start = time.perf_counter()
    result = method.run(
        s.module,
        s.deltas,
        data,
        params=params.model_dump(),
        heads=s.heads,
        forward=s.forward,
        rows=s.rows,
        seed=recipe.seed,
        device=device,
        progress=progress,
    )
    if method.continual:
        *_, result = result
    seconds = time.perf_counter() - start
    summary = {
        "method": recipe.method,
        "tasks": s.tasks,
        "seconds": round(seconds, 3),
        "accuracy": _accuracy(s, result.weights),
        "info": _jsonable(result.info),
    }
    if out is not None:
        _write(out, s, result, recipe, summary, force)
        summary["out"] = str(out)
    return summary


def _bench_tasks(recipe: LearnedRecipe, device: str) -> _Setup:
    from splice.bench.finetune import FinetuneConfig, finetune_cached
    from splice.data.encoders import load_encoder
    from splice.data.local import resolve_task
    from splice.data.registry import Caps, load_task

    task_objs = [resolve_task(str(m)) for m in recipe.models]
    if len({t.modality for t in task_objs}) != 1:
        raise SpliceError("a learned recipe merges tasks of one modality (text or image)")
    names = [t.name for t in task_objs]
    if len(set(names)) != len(names):
        raise SpliceError(f"a task appears twice in models: {names}")
    d = recipe.data
    caps = Caps(train=max(Caps().train, d.samples), val=max(Caps().val, d.samples))
    splits = {t.name: load_task(t, caps, d.seed) for t in task_objs}
    enc = load_encoder(
        task_objs[0].modality,
        text_model=d.text_model,
        max_len=d.max_len,
        image_size=d.image_size,
        device=device,
    )
    cfg = FinetuneConfig(**recipe.finetune)
    runs = {n: finetune_cached(enc, td, cfg, recipe.seed)[0] for n, td in splits.items()}
    parts = {n: getattr(td, d.split) for n, td in splits.items()}
    examples = {n: enc.prepare(p.x[: d.samples]) for n, p in parts.items()}
    state = enc.module.state_dict()

    def write(w: Any, merged: Mapping[str, Tensor]) -> None:
        for name, t in state.items():
            w.write(name, merged.get(name, t))
        heads = {
            f"{n}/{k}": getattr(r.head, k) for n, r in runs.items() for k in ("weight", "bias")
        }
        w.add_file("heads.safetensors", _safetensors(heads))

    model_dir = getattr(getattr(enc.module, "config", None), "_name_or_path", None)
    return _Setup(
        tasks=names,
        module=enc.module,
        deltas={n: r.deltas for n, r in runs.items()},
        examples=examples,
        labels={n: np.asarray(p.y[: d.samples]) for n, p in parts.items()},
        heads={n: r.head for n, r in runs.items()},
        forward=lambda module, batch: enc.features(batch, module=module),
        rows=(lambda b: b["attention_mask"]) if enc.modality == "text" else None,
        write=write,
        copy_from=Path(model_dir) if model_dir and Path(model_dir).is_dir() else None,
    )


@dataclass(frozen=True)
class _Texts:
    """Texts tokenised per batch (padded to the batch's longest)."""

    texts: list[str]
    tokenizer: Any
    max_len: int

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, idx: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        enc = self.tokenizer(
            [self.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in enc.items()}


def _read_texts(path: Path, label2id: Mapping[str, int]) -> tuple[list[str], np.ndarray | None]:
    """``text`` (and, if every row has one, ``label``: an id or a name of the model's labels)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise SpliceError("data file not found", where=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpliceError(f"cannot parse: {e}", where=str(path)) from None
    if not rows or any(r.get("text") is None for r in rows):
        raise SpliceError("every row needs a 'text' field", where=str(path))
    texts = [str(r["text"]) for r in rows]
    if any(r.get("label") is None for r in rows):
        return texts, None
    ids = []
    for r in rows:
        lab = str(r["label"])
        if lab not in label2id and not lab.lstrip("-").isdigit():
            raise SpliceError(
                f"label {lab!r} is neither an id nor one of {sorted(label2id)}", where=str(path)
            )
        ids.append(label2id[lab] if lab in label2id else int(lab))
    return texts, np.asarray(ids, dtype=np.int64)


def _checkpoints(recipe: LearnedRecipe, device: str) -> _Setup:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from splice.io import open_checkpoint

    entries = [m for m in recipe.models if isinstance(m, ModelEntry)]
    names = [Path(e.path).name for e in entries]
    if len(set(names)) != len(names):
        raise SpliceError(f"fine-tune dirs need distinct names, got {names}")
    base = open_checkpoint(recipe.base)
    module = AutoModelForSequenceClassification.from_pretrained(entries[0].path)
    module = module.to(device).eval().requires_grad_(False)
    prefix = f"{module.base_model_prefix}."
    state = module.state_dict()
    to_base = {}  # the module's backbone names -> the base checkpoint's names
    for n, t in state.items():
        b = n if n in base else n.removeprefix(prefix)
        if b in base and t.is_floating_point():
            to_base[n] = b
    if not to_base:
        raise SpliceError(
            "no tensor of the fine-tunes matches the base", where=recipe.base, fix="check base"
        )
    with torch.no_grad():
        for n, b in to_base.items():
            state[n].copy_(base[b])
    deltas, heads, labels, examples = {}, {}, {}, {}
    tokenizer = AutoTokenizer.from_pretrained(entries[0].path)
    for name, e in zip(names, entries, strict=True):
        ck = open_checkpoint(e.path)
        missing = [n for n in to_base if n not in ck]
        if missing:
            raise SpliceError(f"fine-tune lacks {missing[0]!r}", where=e.path)
        deltas[name] = {}
        for n, b in to_base.items():
            tuned = ck[n]
            if not torch.equal(tuned, base[b]):  # unchanged tensors stay out of the merge
                deltas[name][n] = tuned.float() - base[b].float()
        heads[name] = {n: ck[n].to(device) for n in ck.names() if n not in to_base and n in state}
        label2id = dict((ck.config or {}).get("label2id") or {})
        texts, y = _read_texts(Path(e.data), label2id)
        rng = np.random.default_rng(recipe.data.seed)
        keep = np.sort(rng.permutation(len(texts))[: recipe.data.samples])
        examples[name] = _Texts([texts[i] for i in keep], tokenizer, recipe.data.max_len)
        labels[name] = None if y is None else y[keep]

    def write(w: Any, merged: Mapping[str, Tensor]) -> None:
        merged_base = {to_base[n]: t for n, t in merged.items()}
        for b in base.names():
            w.write(b, merged_base[b].to(base[b].dtype) if b in merged_base else base[b])
        flat = {f"{t}/{n}": v.cpu() for t, h in heads.items() for n, v in h.items()}
        w.add_file("heads.safetensors", _safetensors(flat))

    return _Setup(
        tasks=names,
        module=module,
        deltas=deltas,
        examples=examples,
        labels=labels,
        heads=heads,
        forward=lambda m, b: m(**b).logits,
        rows=lambda b: b["attention_mask"],
        write=write,
        copy_from=base.dir,
    )


@torch.no_grad()
def _accuracy(s: _Setup, weights: Mapping[str, Tensor]) -> dict[str, float]:
    """Accuracy of the merged model on each task's examples (tasks with labels)."""
    from splice.merge.learned._data import chunks
    from splice.merge.learned._functional import Network

    net = Network(s.module, s.forward, s.heads, s.tasks)
    dev = next(s.module.parameters()).device
    out = {}
    for t in s.tasks:
        y = s.labels[t]
        if y is None:
            continue
        ex = s.examples[t]
        pred = [
            net.logits(weights, t, ex.batch(i, dev)).argmax(-1).cpu() for i in chunks(len(ex), 64)
        ]
        out[t] = round(float((torch.cat(pred).numpy() == y[: len(ex)]).mean()), 4)
    return out


def _safetensors(tensors: Mapping[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def _jsonable(info: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(
        json.dumps(dict(info), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _write(
    out: str | Path,
    s: _Setup,
    result: Any,
    recipe: LearnedRecipe,
    summary: Mapping[str, Any],
    force: bool,
) -> None:
    from splice.io import CheckpointWriter

    coef = getattr(result, "coefficients", None)
    record = {
        "recipe": recipe.model_dump(mode="json"),
        **dict(summary),
        "coefficients": None if coef is None else coef.tolist(),
        "history": getattr(result, "history", []),
    }
    meta = {"splice.method": recipe.method, "splice.recipe": json.dumps(recipe.model_dump())}
    with CheckpointWriter(out, force=force, copy_files_from=s.copy_from, metadata=meta) as w:
        s.write(w, result.weights)
        w.add_file("splice-learned.json", json.dumps(record, indent=2) + "\n")
