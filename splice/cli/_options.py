"""Option parsing shared by commands: ``--set key=value`` pairs with JSON values."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_sets"]


def parse_sets(items: list[str] | None, example: str, flag: str = "--set") -> dict[str, Any]:
    """``["k=16", "name=x"]`` → ``{"k": 16, "name": "x"}`` (JSON values, else strings).

    Raises:
        UsageError: an item without ``=`` (``example`` shows the form, after ``flag``).
    """
    from splice.errors import UsageError

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{flag} {item!r} is not key=value", fix=f"e.g. {flag} {example}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
