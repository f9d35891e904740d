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
from splice.merge.recipe.splice import load_recipe, recipe_json

__all__ = [
    "Gradient",
    "ModelSpec",
    "ParamResolver",
    "Recipe",
    "Rule",
    "evaluate",
    "load_recipe",
    "method_table",
    "parse_dtype",
    "parse_setting",
    "recipe_json",
]
