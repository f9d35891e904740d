"""splice's recipe dialect::

    method: ties
    base: ./base
    models:
      - ./ft_a                                  # a checkpoint, PEFT adapter dir or delta file
      - {path: ./ft_b, params: {weight: 0.5}}
    params: {density: 0.2, lambda: 1.0}         # method params + defaults for per-model ones
    seed: 0
    dtype: float32                              # compute dtype; out_dtype: storage dtype
    lines: {beta: 0.5}                          # optional post-merge transform
    vocab: union                                # when embedding rows differ: base|union|intersect
    output: adapter                             # LoRA dirs in, one LoRA dir out (rank: 16|exact)

Values may vary with depth, tensor name or block type (:mod:`.settings`). A recipe with
``merge_method:`` is mergekit's (:mod:`.mergekit`). Unknown keys, methods and parameters are
errors, with a suggestion. Paths are local; a relative path is resolved from the working
directory and is never a hub id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from splice._registry import module_names
from splice._schema import Strict
from splice.errors import SpliceError
from splice.merge.recipe.mergekit import from_mergekit
from splice.merge.recipe.settings import ModelSpec, Recipe, parse_dtype, parse_setting, recipe_error
from splice.merge.recipe.where import Where

__all__ = [
    "ModelEntry",
    "SpliceRecipe",
    "is_learned_recipe",
    "load_recipe",
    "read_recipe",
    "recipe_from_raw",
    "recipe_json",
]


class ModelEntry(Strict):
    path: str = Field(description="checkpoint dir/file, PEFT adapter dir or splice delta file")
    params: dict[str, Any] = Field(default_factory=dict, description="per-model parameters")


class SpliceRecipe(Strict):
    method: str = Field(description="merge method (see `splice merge --list`)")
    base: str | None = Field(None, description="the pretrained checkpoint (task vectors' origin)")
    models: list[str | ModelEntry] = Field(min_length=1, description="the models to merge")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    seed: int = Field(0, description="seed of stochastic methods (per-tensor RNG)")
    dtype: str | None = Field(None, description="compute dtype (default float32)")
    out_dtype: str | None = Field(None, description="output dtype (default: the base's)")
    lines: dict[str, Any] | None = Field(None, description="LiNeS depth scaling after the merge")
    vocab: Literal["base", "union", "intersect"] | None = Field(
        None, description="embedding/head rows that differ between inputs: whose rows to keep"
    )
    output: Literal["model", "adapter"] = Field(
        "model", description="a merged model dir, or (LoRA inputs only) one LoRA adapter dir"
    )
    rank: Annotated[int, Field(ge=1)] | Literal["exact"] | None = Field(
        None,
        description="output: adapter — LoRA rank of the truncated SVD, or 'exact' (linear methods)",
    )


def read_recipe(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A recipe file (strict YAML) or dict as a plain dict, and where it came from.

    Raises:
        SpliceError: no such file, unreadable YAML, not a mapping.
    """
    what = "recipe"
    if isinstance(source, str | Path):
        path = Path(source)
        what = str(path)
        if not path.is_file():
            raise SpliceError("recipe file not found", where=str(path))
        from splice._yaml import load_yaml

        raw = load_yaml(path)
    else:
        raw = dict(source)
    if not isinstance(raw, dict):
        raise SpliceError("a recipe must be a mapping of keys to values", where=what)
    return raw, what


def is_learned_recipe(source: str | Path | Mapping[str, Any]) -> bool:
    """True when the recipe has a ``data:`` section or names a learned method
    (:mod:`splice.merge.learned`; answered from its file names, without importing it)."""
    raw, _ = read_recipe(source)
    return "data" in raw or raw.get("method") in module_names("splice.merge.learned")


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """Read a recipe file or dict (either dialect) and check its schema.

    Raises:
        SpliceError: unreadable YAML, unknown keys, unsupported mergekit features.
    """
    raw, what = read_recipe(source)
    where = Where.of_file(Path(what)) if isinstance(source, str | Path) else Where(what)
    return recipe_from_raw(raw, what, where)


def recipe_from_raw(raw: dict[str, Any], what: str, where: Where | None = None) -> Recipe:
    """The :class:`Recipe` of one recipe document ``raw`` (either dialect) read from ``what``;
    ``where`` gives its values' ``file:line`` for errors."""
    if "merge_method" in raw:
        return from_mergekit(raw, what, where)
    try:
        r = SpliceRecipe.model_validate(raw)
    except ValidationError as e:
        raise recipe_error(e, what, SpliceRecipe, ModelEntry) from None
    models = []
    for i, m in enumerate(r.models):
        entry = ModelEntry(path=m) if isinstance(m, str) else m
        where = f"models[{i}]"
        settings = {
            k: parse_setting(v, f"{where}.params.{k}", mergekit=False)
            for k, v in entry.params.items()
        }
        models.append(ModelSpec(entry.path, None, settings))
    return Recipe(
        method=r.method,
        base=r.base,
        models=models,
        settings={k: parse_setting(v, f"params.{k}", mergekit=False) for k, v in r.params.items()},
        seed=r.seed,
        dtype=parse_dtype(r.dtype),
        out_dtype=parse_dtype(r.out_dtype, "out_dtype"),
        lines=r.lines,
        vocab=r.vocab,
        output=r.output,
        rank=r.rank,
        dialect="splice",
        source=raw,
    )


def recipe_json(recipe: Recipe) -> str:
    """The recipe as given, for the output's metadata."""
    return json.dumps(recipe.source, sort_keys=True, default=str)
