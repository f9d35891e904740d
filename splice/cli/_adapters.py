"""``--adapter NAME=DIR`` / ``--active`` options: named adapters loaded into a command's model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from splice.errors import SpliceError

AdapterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="Adapter dir to load, NAME=DIR (or DIR, named 'default'); repeat for several.",
    ),
]
ActiveOption = Annotated[
    str | None,
    typer.Option(
        help="Adapters that act: NAME, or NAME:WEIGHT,… (a weighted set), or 'none' "
        "(default: the first --adapter)."
    ),
]


def load_named(model: Any, specs: list[str] | None, active: str | None) -> None:
    """Load each ``NAME=DIR`` of ``specs`` into ``model`` under its name, then set ``active``.

    Raises:
        SpliceError: a malformed spec or weight, a dir that is not an adapter, an adapter
            trained on another base, or ``active`` naming an adapter not loaded.
    """
    from splice.adapters import DEFAULT, load_adapter, set_active_adapters

    if active is not None and not specs:
        raise SpliceError("--active needs --adapter", fix="load adapters with --adapter NAME=DIR")
    for spec in specs or []:
        name, sep, path = spec.rpartition("=")
        load_adapter(model, Path(path), adapter_name=name if sep else DEFAULT)
    if active is None:
        return
    weights: dict[str, float] = {}
    for part in [] if active == "none" else active.split(","):
        name, sep, w = part.partition(":")
        try:
            weights[name] = float(w) if sep else 1.0
        except ValueError:
            raise SpliceError(
                f"--active weight {w!r} of {name!r} is not a number",
                fix="e.g. --active a:0.5,b:0.5",
            ) from None
    set_active_adapters(model, weights)
