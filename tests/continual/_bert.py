"""A random 2-layer BERT (word vocab) and three small CSV tasks, shared by the continual tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILLER = ["the", "a", "it", "was", "this", "day", "very"]
TASKS = {
    "mood": {"pos": ["good", "great", "happy"], "neg": ["bad", "awful", "sad"]},
    "topic": {"animal": ["cat", "dog"], "vehicle": ["car", "bus"], "meal": ["soup", "cake"]},
    "size": {"big": ["huge", "large"], "small": ["tiny", "little"]},
}


def make_bert_and_tasks(root: Path) -> tuple[Path, dict[str, Path]]:
    """A random 2-layer BERT (word vocab) under ``root/model`` and three CSV tasks."""
    import torch
    import transformers

    words = sorted({*FILLER, *(w for t in TASKS.values() for ws in t.values() for w in ws)})
    (root / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    model_dir = root / "model"
    transformers.BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    transformers.BertModel(
        transformers.BertConfig(
            vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
        )
    ).save_pretrained(model_dir)  # fmt: skip
    rng = np.random.default_rng(0)
    paths = {}
    for name, classes in TASKS.items():
        lines = ["text,label"]
        for i in range(60):
            label = sorted(classes)[i % len(classes)]
            ws = list(rng.choice(FILLER, 4)) + list(rng.choice(classes[label], 2))
            lines.append(f"{' '.join(ws)},{label}")
        paths[name] = root / f"{name}.csv"
        paths[name].write_text("\n".join(lines) + "\n")
    return model_dir, paths
