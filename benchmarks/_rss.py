"""Peak RSS for the benchmarks: each process's own ``VmHWM``.

Not ``ru_maxrss``: Linux carries that over fork + exec, so a child started by a benchmark
process that has loaded torch (or built fixtures) would report at least its parent's RSS.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IMPORT", "peak_rss_mib"]


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB) since it was exec'd."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM")).split()[1]) / 1024


_HERE = str(Path(__file__).resolve().parent)
IMPORT = f"import sys\nsys.path.insert(0, {_HERE!r})\nfrom _rss import peak_rss_mib\n"
"""Prefix for code run with ``python -c``: makes :func:`peak_rss_mib` available there."""
