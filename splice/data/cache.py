"""The on-disk cache of task splits and fine-tunes: where it lives, stable keys.

Entries are written into a temporary sibling and renamed into place, so an interrupted run
(Ctrl-C, a crash) never leaves a half-written entry; the next run simply redoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "file_sha256", "stable_hash"]


def cache_root() -> Path:
    """``$SPLICE_CACHE``, else ``$XDG_CACHE_HOME/splice``, else ``~/.cache/splice``."""
    if env := os.environ.get("SPLICE_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "splice"


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
