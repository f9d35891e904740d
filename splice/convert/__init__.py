"""Model conversion: change a pretrained model's architecture (spec peft.md §8).

    from splice.convert import convert_recursive, save_recursive
    rec = convert_recursive(model, k=10, init="average", rank=32)   # 30 layers → 10 × 3 loops

One method per file: :mod:`.recursive` (Relaxed Recursive Transformers: CYCLE tying, the
three initialisations, SVD relaxation), :mod:`.modeling_recursive` (the HF model class, copied
next to the weights on save), :mod:`.early_exit` (depth-wise batched generation with early
exit), :mod:`.prune` (depth pruning, the equal-size baseline), :mod:`.widenet` (WideNet /
ViT / ViT-MoE), and for cross-scale transfer (spec other.md §5) :mod:`.attribution`,
:mod:`.slicer`, :mod:`.laten` and :mod:`.postpkt`. Importing this package registers the
recursive model with the ``transformers`` Auto classes, so converted directories load
without ``trust_remote_code``.
"""

from __future__ import annotations

from .early_exit import ExitStats, generate_early_exit
from .modeling_recursive import LoopLoRALinear, RecursiveLlamaConfig, RecursiveLlamaForCausalLM
from .prune import depth_prune, stepwise_layers
from .recursive import INITS, convert_recursive, cycle_map, init_shared, save_recursive, svd_relax

__all__ = [
    "INITS",
    "ExitStats",
    "LoopLoRALinear",
    "RecursiveLlamaConfig",
    "RecursiveLlamaForCausalLM",
    "convert_recursive",
    "cycle_map",
    "depth_prune",
    "generate_early_exit",
    "init_shared",
    "register",
    "save_recursive",
    "stepwise_layers",
    "svd_relax",
]


def register() -> None:
    """Register the recursive Llama with ``AutoConfig``/``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(RecursiveLlamaConfig.model_type, RecursiveLlamaConfig)
        AutoModelForCausalLM.register(RecursiveLlamaConfig, RecursiveLlamaForCausalLM)
    except ValueError:  # already registered
        pass


register()
