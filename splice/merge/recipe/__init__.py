"""Merge recipes: splice's YAML (:mod:`.splice`) and mergekit's (:mod:`.mergekit`), both read
into one :class:`Recipe` whose values (:mod:`.settings`) resolve per tensor."""

from splice.merge.recipe.settings import (
    Gradient,
    ModelSpec,
    ParamResolver,
    Recipe,
    Rule,
    evaluate,
    method_table,
    parse_dtype,
    parse_setting,
)
from splice.merge.recipe.splice import (
    is_learned_recipe,
    load_recipe,
    read_recipe,
    recipe_from_raw,
    recipe_json,
)

__all__ = [
    "Gradient",
    "ModelSpec",
    "ParamResolver",
    "Recipe",
    "Rule",
    "evaluate",
    "is_learned_recipe",
    "load_recipe",
    "method_table",
    "parse_dtype",
    "parse_setting",
    "read_recipe",
    "recipe_from_raw",
    "recipe_json",
]
