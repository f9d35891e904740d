"""Parsing of dotted module / tensor names shared by every stage (one copy of each rule)."""

from __future__ import annotations

import re

__all__ = ["INDEX", "layer_index"]

INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
"""A purely numeric component of a dotted name (``model.layers.3.mlp`` → ``3``)."""


def layer_index(name: str) -> int | None:
    """The first numeric component of ``name`` (its layer in a stack), or None."""
    m = INDEX.search(name)
    return int(m.group(1)) if m else None
