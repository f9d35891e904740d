"""What ``splice evolve`` searches::

recipe: ./recipe.yml           # any merge recipe (splice's or mergekit's dialect)
search:                        # dotted key paths into the recipe, each a real interval
  - {path: parameters.t, low: 0.0, high: 1.0}
  - {path: models.1.parameters.weight, low: 0.0, high: 2.0}
trials: 40                     # total, across restarts
popsize: 8                     # CMA-ES population (trials run in parallel per generation)
sigma0: 0.3                    # initial step, as a fraction of each interval
seed: 0
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from splice._schema import Strict
from splice.errors import SpliceError
from splice.merge.recipe.settings import recipe_error
from splice.merge.recipe.where import Where

__all__ = ["Dimension", "Genome", "apply", "load_genome"]


class Dimension(Strict):
    path: str = Field(description="dotted key path into the recipe (list items by index)")
    low: float
    high: float


class Genome(Strict):
    recipe: str
    search: list[Dimension] = Field(min_length=1)
    trials: int = Field(20, ge=1)
    popsize: int | None = Field(None, ge=2)
    seed: int = 0


def _walk(raw: Any, keys: list[str], where: str) -> tuple[Any, Any]:
    """The container holding the last key of ``keys``, and that key (an int for lists)."""
    node = raw
    for i, key in enumerate(keys):
        k: Any = int(key) if isinstance(node, list) and key.isdigit() else key
        last = i == len(keys) - 1
        ok = (isinstance(node, dict) and k in node) or (
            isinstance(node, list) and isinstance(k, int) and k < len(node)
        )
        if not ok:
            raise SpliceError(
                f"search path {'.'.join(keys)!r}: no {key!r} in the recipe",
                where=where,
                fix="write the path of a key the recipe has (list items by index)",
            )
        if last:
            return node, k
        node = node[k]
    raise AssertionError


def apply(raw: dict[str, Any], genome: Genome, values: dict[str, float]) -> dict[str, Any]:
    """A copy of the recipe ``raw`` with each searched value set."""
    out = copy.deepcopy(raw)
    for dim in genome.search:
        parent, key = _walk(out, dim.path.split("."), dim.path)
        parent[key] = float(values[dim.path])
    return out


def load_genome(path: str | Path) -> tuple[Genome, dict[str, Any]]:
    """The genome and the recipe it searches, checked (every path exists, low < high).

    Raises:
        SpliceError: unreadable files, unknown keys, a path the recipe lacks, an empty
            interval — naming the genome's line.
    """
    from splice._yaml import load_yaml
    from splice.merge.recipe import load_recipe, read_recipe

    p = Path(path)
    if not p.is_file():
        raise SpliceError("genome file not found", where=str(p))
    where = Where.of_file(p)
    try:
        g = Genome.model_validate(load_yaml(p))
    except ValidationError as e:
        raise recipe_error(e, str(p), Genome, Dimension) from None
    recipe_path = Path(g.recipe)
    if not recipe_path.is_absolute():
        recipe_path = p.parent / recipe_path
    raw, _ = read_recipe(recipe_path)
    for i, dim in enumerate(g.search):
        if not dim.low < dim.high:
            raise SpliceError(
                f"search interval [{dim.low}, {dim.high}] is empty", where=where("search", i)
            )
        _walk(raw, dim.path.split("."), where("search", i, "path"))
    load_recipe(apply(raw, g, {d.path: d.low for d in g.search}))  # the recipe stays valid
    return g.model_copy(update={"recipe": str(recipe_path)}), raw
