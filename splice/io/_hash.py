"""SHA-256 of files, read in 1 MB blocks (hashlib releases the GIL, so a thread overlaps)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 20


def hash_files(paths: Iterable[Path]) -> dict[str, str]:
    """``{str(path): sha256 hex}`` of each file."""
    out = {}
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        out[str(p)] = h.hexdigest()
    return out
