"""wordnet_supersense: noun gloss → WordNet lexicographer file (25 supersenses).

From Debian ``wordnet-base`` ``data.noun``: lexfile = 2nd field, gloss = text after ``" | "``
up to the first ``; "`` (quoted examples dropped), at least 3 words; noun.Tops is dropped.
"""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Source, Task

DATA_NOUN = Source(
    "wordnet-base",
    "/usr/share/wordnet/data.noun",
    "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
)
# lexnames(5WN): noun lexicographer files 04..28 (03 = noun.Tops is dropped).
CLASSES = tuple(
    f"noun.{n}"
    for n in [
        "act",
        "animal",
        "artifact",
        "attribute",
        "body",
        "cognition",
        "communication",
        "event",
        "feeling",
        "food",
        "group",
        "location",
        "motive",
        "object",
        "person",
        "phenomenon",
        "plant",
        "possession",
        "process",
        "quantity",
        "relation",
        "shape",
        "state",
        "substance",
        "time",
    ]
)
FIRST_LEXFILE = 4


def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    texts: list[str] = []
    labels: list[int] = []
    with open(DATA_NOUN.locate(), encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue
            lexfile = int(line.split(" ", 2)[1])
            gloss = line.split(" | ", 1)[1].split('; "', 1)[0].strip()
            if lexfile >= FIRST_LEXFILE and len(gloss.split()) >= 3:
                texts.append(gloss)
                labels.append(lexfile - FIRST_LEXFILE)
    return texts, np.array(labels), CLASSES


TASKS.register("wordnet_supersense")(
    Task(
        "wordnet_supersense",
        "text",
        read,
        key=DATA_NOUN.sha256,
        description="noun gloss → supersense, 25 classes (WordNet 3.0, Debian wordnet-base)",
        license="WordNet 3.0 license (permissive, Princeton)",
    )
)
