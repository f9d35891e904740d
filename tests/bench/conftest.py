"""The benchmark tests' tiny model and tasks: a random 2-layer BERT and two CSV tasks."""

from __future__ import annotations

import numpy as np
import pytest

FILLER = ["the", "a", "it", "was", "this", "that", "day", "film", "food", "very", "quite"]
TOPICS = {
    "mood": {"pos": ["good", "great", "fine", "happy"], "neg": ["bad", "awful", "sad", "poor"]},
    "topic": {
        "animal": ["cat", "dog", "bird", "fish"],
        "vehicle": ["car", "bus", "train", "boat"],
        "meal": ["bread", "rice", "soup", "cake"],
    },
}


def _write_task(path, classes, rng, n=150):
    lines = ["text,label"]
    names = sorted(classes)
    for i in range(n):
        label = names[i % len(names)]
        words = list(rng.choice(FILLER, 7))
        for w in rng.choice(classes[label], 2):
            words.insert(int(rng.integers(len(words) + 1)), str(w))
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT with a word-level vocab, and two CSV tasks."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    words = sorted({*FILLER, *(w for t in TOPICS.values() for ws in t.values() for w in ws)})
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    model_dir = root / "model"
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(str(model_dir))
    cfg = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(str(model_dir))
    rng = np.random.default_rng(0)
    paths = []
    for name, classes in TOPICS.items():
        _write_task(root / f"{name}.csv", classes, rng)
        paths.append(str(root / f"{name}.csv"))
    return model_dir, paths
