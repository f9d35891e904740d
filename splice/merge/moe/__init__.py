"""Mixture-of-experts assembly from dense models (mergekit-moe): attention, norms and
embeddings from a base, each expert's MLP from a fine-tune of it, a router per layer
initialized from prompts (:mod:`.router`), written as a Mixtral or Qwen2-MoE checkpoint that
``transformers`` loads (:mod:`.build`); the YAML is mergekit-moe's (:mod:`.config`)."""

from splice.merge.moe.build import build_moe
from splice.merge.moe.config import MoeRecipe, load_moe_recipe

__all__ = ["MoeRecipe", "build_moe", "load_moe_recipe"]
