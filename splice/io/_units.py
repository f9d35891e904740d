"""Human units for sizes: "2GB" in, "1.9 GiB" out."""

from __future__ import annotations

import re

from splice.errors import SpliceError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string like ``"500MB"``, ``"2GB"``, ``"1.5GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise SpliceError(f"size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise SpliceError(
            f"cannot parse size {value!r}", fix='use a number of bytes or units like "500MB", "2GB"'
        )
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise SpliceError(f"size must be positive, got {value!r}")
    return size


def human_bytes(n: float) -> str:
    """Format a byte count with binary units: ``1536 -> "1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """Format a parameter count: ``22713216 -> "22.7M"``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))
