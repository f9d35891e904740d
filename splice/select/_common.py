"""What the selectors share: the candidate weight matrices of a model and budget errors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from splice._names import layer_index
from splice.adapters.inject import find_sites
from splice.errors import SpliceError

__all__ = ["budget_error", "layer_count", "matrix_sites"]


def budget_error(value: int, limit: int, what: str) -> SpliceError:
    """The one-line error for a budget outside ``1..limit``."""
    return SpliceError(
        f"budget {value} is outside 1..{limit} ({limit} {what})", fix=f"choose 1..{limit}"
    )


def matrix_sites(
    model: nn.Module, targets: Sequence[str] | None = None
) -> dict[str, tuple[nn.Module, bool]]:
    """name → (module, stored transposed?) for the weight matrices a selector ranks:
    ``targets`` (module-name suffixes), or by default every Linear / GPT-2 Conv1D inside a
    layer stack (a name with a layer index), so heads and embeddings stay out.

    Raises:
        SpliceError: a target matches nothing adaptable, or the model has no such layer.
    """
    if targets is None:
        names = [
            n
            for n, m in model.named_modules()
            if layer_index(n) is not None and type(m).__name__ in ("Linear", "Conv1D")
        ]
        if not names:
            raise SpliceError(
                f"{type(model).__name__} has no Linear layer inside a numbered layer stack",
                fix="pass targets (module name suffixes)",
            )
        targets = names
    return {
        name: (module, site.kind == "conv1d_gpt2")
        for name, module, site in find_sites(model, list(targets))
        if site.kind in ("linear", "conv1d_gpt2")
    }


def layer_count(model: nn.Module) -> int:
    """Number of layers in the model's stack: 1 + the largest layer index in a module name."""
    found = [i for n, _ in model.named_modules() if (i := layer_index(n)) is not None]
    if not found:
        raise SpliceError(f"{type(model).__name__} has no numbered layer stack")
    return max(found) + 1
