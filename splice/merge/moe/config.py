"""The MoE recipe (mergekit-moe's YAML)::

base_model: ./base                # attention, norms, embeddings, head
architecture: mixtral             # or qwen2_moe (default: qwen2_moe with shared experts)
gate_mode: hidden                 # hidden | cheap_embed | random (needs allow_random)
experts_per_token: 2
dtype: bfloat16
experts:
  - source_model: ./ft_code
    positive_prompts: ["def f(x):"]
    negative_prompts: ["Once upon a time"]
    residual_scale: 1.0           # scales the expert's down projection
    noise_scale: 0.0              # adds N(0, noise_scale²) to its MLP weights
shared_experts:                   # qwen2_moe only: at most one
  - source_model: ./base
    positive_prompts: ["..."]
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from splice._schema import Strict
from splice.errors import SpliceError
from splice.merge.recipe.settings import parse_dtype, recipe_error
from splice.merge.recipe.where import Where

__all__ = ["Expert", "MoeRecipe", "load_moe_recipe"]


class Expert(Strict):
    source_model: str = Field(description="the dense model whose MLPs become this expert")
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoeRecipe(Strict):
    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    dtype: str | None = None
    experts_per_token: int = Field(2, ge=1)
    shared_experts: list[Expert] | None = None
    architecture: Literal["mixtral", "qwen2_moe"] | None = None


def load_moe_recipe(path: str | Path) -> tuple[MoeRecipe, Where]:
    """Read and check an MoE recipe file; errors name its ``file:line``.

    Raises:
        SpliceError: unknown keys, too few experts, prompts missing where the gate mode needs
            them, shared experts for Mixtral, a bad dtype.
    """
    from splice._yaml import load_yaml

    p = Path(path)
    if not p.is_file():
        raise SpliceError("recipe file not found", where=str(p))
    raw = load_yaml(p)
    where = Where.of_file(p)
    if not isinstance(raw, dict):
        raise SpliceError("an MoE recipe must be a mapping", where=where())
    try:
        r = MoeRecipe.model_validate(raw)
    except ValidationError as e:
        raise recipe_error(e, str(p), MoeRecipe, Expert) from None
    parse_dtype(r.dtype)
    if len(r.experts) < r.experts_per_token:
        raise SpliceError(
            f"{len(r.experts)} experts but experts_per_token is {r.experts_per_token}",
            where=where("experts_per_token"),
            fix="give at least experts_per_token experts",
        )
    if r.gate_mode != "random":
        for i, e in enumerate(r.experts + (r.shared_experts or [])):
            if not e.positive_prompts:
                key = ("experts", i) if i < len(r.experts) else ("shared_experts", 0)
                raise SpliceError(
                    f"gate_mode {r.gate_mode} needs positive_prompts for every expert",
                    where=where(*key),
                    fix="add positive_prompts (what this expert should handle), or "
                    "gate_mode: random with allow_random",
                )
    if r.shared_experts and len(r.shared_experts) > 1:
        raise SpliceError("at most one shared expert", where=where("shared_experts"))
    if r.shared_experts and r.architecture == "mixtral":
        raise SpliceError(
            "Mixtral has no shared experts",
            where=where("shared_experts"),
            fix="use architecture: qwen2_moe, or drop shared_experts",
        )
    return r, where
