"""Self-speculation: the target's first ``k`` blocks with its own final norm and head as the
drafter (spec other.md §1.9 (a); issue #29). It shares the target's weights (no copy, no
training) and therefore its tokenizer, so the lossless rule applies unchanged.
"""

from __future__ import annotations

import copy

from torch import nn

from splice.errors import SpliceError

__all__ = ["block_list", "early_exit"]


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ``ModuleList`` of a causal LM's transformer blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, mod
    raise SpliceError(
        f"found no list of {n} transformer blocks in {type(model).__name__}",
        fix="self-speculation needs a Llama-style causal LM with config.num_hidden_layers",
    )


def early_exit(model: nn.Module, k: int) -> nn.Module:
    """A view of ``model`` that runs only its first ``k`` blocks (weights shared)."""
    path, blocks = block_list(model)
    if not 1 <= k < len(blocks):
        raise SpliceError(
            f"--self-draft {k} is outside [1, {len(blocks) - 1}]",
            fix=f"the target has {len(blocks)} blocks; the drafter must use fewer",
        )
    config = copy.copy(model.config)
    config.num_hidden_layers = k
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:k]
    view = _shallow(model)
    view.config = config
    parent = view
    *parents, leaf = path.split(".")
    for name in parents:
        child = _shallow(parent._modules[name])
        if hasattr(child, "config"):
            child.config = config
        parent._modules[name] = child
        parent = child
    parent._modules[leaf] = nn.ModuleList(list(blocks)[:k])
    return view


def _shallow(m: nn.Module) -> nn.Module:
    c = copy.copy(m)
    c._modules = dict(m._modules)  # a private dict, so replacing a child leaves ``m`` intact
    return c
