"""The one strict schema base and the one pydantic-error → :class:`SpliceError` conversion.

Every user-facing schema (recipes, method hyperparameters, adapter and training configs)
derives from :class:`Strict`: unknown keys are errors (a misspelled ``densty:`` must not be
ignored) and a validated config is immutable. :func:`schema_error` turns pydantic's first
error into one actionable line: the location, the message, and for an unknown key the
closest known one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from splice.errors import SpliceError

__all__ = ["Strict", "did_you_mean", "schema_error", "validate"]

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A frozen pydantic model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def did_you_mean(key: str, known: Iterable[str], label: str = "known") -> str:
    """``did you mean 'x'?`` for the closest of ``known``, else the list itself."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"{label}: {', '.join(known) or 'none'}"


def schema_error(
    e: ValidationError,
    *,
    prefix: str = "",
    where: str | None = None,
    fix: str | None = None,
    known: Iterable[str] | None = None,
    unknown: str = "key",
    show_input: bool = False,
) -> SpliceError:
    """The first error of ``e`` as a :class:`SpliceError`.

    The message is ``{prefix}{loc}: {msg}``; with ``show_input``, a top-level field's error
    reads ``{prefix}{loc}={value!r}: {msg}`` (the value given beside the range allowed). An
    unknown key (``extra_forbidden``) reads ``unknown {unknown} 'key'`` and its fix names the
    closest of ``known`` (when given).
    """
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if show_input and len(err["loc"]) == 1 and err["type"] != "extra_forbidden":
        loc = f"{loc}={err['input']!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and known is not None:
        key = str(err["loc"][-1])
        at = f"{prefix}{loc}" if prefix else loc
        return SpliceError(
            f"unknown {unknown} {key!r}", where=where or at, fix=did_you_mean(key, known)
        )
    head = f"{prefix}{loc}: " if loc else prefix
    return SpliceError(f"{head}{msg}", where=where, fix=fix)


def validate(model: type[M], values: object, **error: object) -> M:
    """``model.model_validate(values)``, raising :func:`schema_error` (``error`` are its
    keyword arguments) instead of pydantic's exception."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise schema_error(e, **error) from None  # type: ignore[arg-type]
