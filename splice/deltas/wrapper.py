"""The task-head wrapper prefix between an adapter's target names and a base checkpoint's.

A ``transformers`` model class with a task head holds the bare model under one attribute, its
``base_model_prefix``: ``BertForSequenceClassification`` stores ``bert.encoder.…`` where a
``BertModel`` checkpoint (MiniLM, say) has ``encoder.…``; ``LlamaForCausalLM`` has
``model.layers.…`` where ``LlamaModel`` has ``layers.…``. ``transformers`` strips or adds that
prefix when it loads one class's checkpoint into the other; :func:`wrapper_map` finds the same
mapping for an adapter trained on one class and a base saved as the other.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["WRAPPER_PREFIXES", "WrapperMap", "wrapper_map"]

WRAPPER_PREFIXES = frozenset(
    {
        *("model", "transformer", "bert", "roberta", "distilbert", "albert", "electra"),
        *("deberta", "mpnet", "xlm", "vit", "gpt_neox", "language_model", "backbone"),
    }
)
"""The most common ``base_model_prefix`` values of ``transformers`` model classes; the base's
``model_type`` (``-`` read as ``_``) is tried as well."""


@dataclass(frozen=True)
class WrapperMap:
    """Strip (``strip``: the adapter was trained on the wrapper) or add ``prefix + "."``."""

    prefix: str
    strip: bool

    def __call__(self, name: str) -> str:
        if self.strip:
            return name.removeprefix(f"{self.prefix}.")
        return f"{self.prefix}.{name}"

    def to_base(self, name: str, base_names: Collection[str]) -> str:
        """``name`` mapped when that is a base name, else as it is (a task head the base lacks,
        or a saved module the base names alike)."""
        mapped = self(name)
        return mapped if mapped in base_names else name

    def describe(self) -> str:
        return f"wrapper prefix '{self.prefix}.' {'stripped' if self.strip else 'added'}"


def wrapper_map(
    targets: Collection[str], base_names: Collection[str], model_type: str | None = None
) -> WrapperMap | None:
    """The one wrapper prefix whose stripping or adding makes every target a base name.

    Only when some target is not a base name as it stands, and only when exactly one known
    prefix (:data:`WRAPPER_PREFIXES`, the ``model_type``) maps every target to a distinct base
    name; None otherwise (nothing to map, no such prefix, or more than one).
    """
    names = set(base_names)
    if not targets or all(t in names for t in targets):
        return None
    known = set(WRAPPER_PREFIXES)
    if model_type:
        known.add(model_type.replace("-", "_"))
    fits = []
    for prefix in sorted(known):
        for strip in (True, False):
            m = WrapperMap(prefix, strip)
            if strip and not any(t.startswith(f"{prefix}.") for t in targets):
                continue
            mapped = {m(t) for t in targets}
            if len(mapped) == len(targets) and mapped <= names:
                fits.append(m)
    return fits[0] if len(fits) == 1 else None
