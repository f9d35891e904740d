"""Find the stack of blocks (transformer layers, SSM blocks) whose outputs the hooks see.

A model's blocks are the longest :class:`~torch.nn.ModuleList` whose children all share one
class (``model.layers`` of Llama/Qwen/Mistral, ``encoder.layer`` of BERT, ``transformer.h``
of GPT-2, ``backbone.layers`` of Mamba). Block ``ℓ``'s output is ``hidden_states[ℓ + 1]``
in the Hugging Face convention (other.md §0).
"""

from __future__ import annotations

from torch import nn

from splice.errors import SpliceError

__all__ = ["block_path", "blocks", "check_layers"]


def block_path(model: nn.Module) -> str:
    """The qualified name of the block list (e.g. ``model.layers``).

    Raises:
        SpliceError: no ModuleList of two or more same-class modules (names the class).
    """
    best, size = "", 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and len(module) > size:
            best, size = name, len(module)
    if not size:
        raise SpliceError(
            f"{type(model).__name__} has no stack of blocks to hook "
            "(no ModuleList of two or more modules of one class)",
            fix="pass a transformer or SSM model whose layers sit in an nn.ModuleList",
        )
    return best


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's blocks, in order (see the module docstring)."""
    return model.get_submodule(block_path(model))


def check_layers(layers: int | list[int], n: int) -> list[int]:
    """``layers`` as a list, each checked against ``n`` blocks; negative counts from the end.

    Raises:
        SpliceError: an index outside ``-n … n-1``.
    """
    items = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in items:
        if not -n <= layer < n:
            raise SpliceError(
                f"layer {layer} out of range", fix=f"the model has {n} blocks: use 0…{n - 1}"
            )
        out.append(layer % n)
    return out
