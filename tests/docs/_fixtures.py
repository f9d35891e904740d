"""Fixtures for the executed documentation: the files and Python objects examples name.

``build_workdir(path)`` writes every file an example refers to (tiny random checkpoints, PEFT
LoRA dirs, a tiny BERT with a tokenizer, CSV/JSONL data); each example runs in a fresh copy.
``NAMESPACES[name]()`` builds the Python objects a block uses without defining them (``model``,
``sd_a``, ...), selected in the Markdown with ``<!-- doc-test: fixture=NAME -->``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.merge._ckpt import finetune, lora_adapter, save, tiny_llama

WORDS = ["good", "great", "fine", "fun", "bad", "awful", "poor", "dull", "movie", "the", "was"]
ATTN = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(3) for m in ("q", "v")]


def _bert(vocab: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.BertModel(cfg)


def _bert_dir(path: Path) -> Path:
    """A tiny random BERT with a word-level tokenizer (what ``splice train`` needs)."""
    import transformers

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    _bert(len(vocab)).save_pretrained(path)
    return path


def _text_rows(n: int = 48) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        words = WORDS[:4] if i % 2 else WORDS[4:8]
        pick = [words[j] for j in torch.randint(0, 4, (3,), generator=g).tolist()]
        rows.append((f"the movie was {' '.join(pick)}", "pos" if i % 2 else "neg"))
    return rows


MERGEKIT_YML = """\
merge_method: ties
base_model: ./base
models:
  - model: ./math
    parameters: {density: 0.5, weight: 0.5}
  - model: ./code
    parameters: {density: 0.5, weight: 0.5}
dtype: float32
"""


def build_workdir(root: Path) -> Path:
    """Write every file and directory the documented examples name into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(0)
    llama = {"base": base, "base_dir": base, "path/to/model": base, "MODEL": base}
    for i, name in enumerate(["math", "code", "tuned", "ft_sun397", "ft_cars", "ft_dtd"]):
        llama[name] = finetune(base, i)
    llama["MODEL_A"], llama["MODEL_B"] = base, llama["math"]
    for name, sd in llama.items():
        save(sd, root / name)
    for i, name in enumerate(["code-lora", "lora_math", "lora_code", "my-peft-lora"]):
        lora_adapter(root / name, base, ATTN, seed=i)
        (root / name / "adapter_config.json").write_text(
            json.dumps({**json.loads((root / name / "adapter_config.json").read_text()),
                        "target_modules": ["q_proj", "v_proj"]})
        )  # fmt: skip
    _bert_dir(root / "MODEL_DIR")
    rows = _text_rows()
    for name in ("data.csv", "my.csv"):
        (root / name).write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows))
    (root / "mergekit.yml").write_text(MERGEKIT_YML)
    return root


def _adapters() -> dict:
    """``model`` (a tiny BERT with query/value projections), ``base_model``, ``task_loss``."""
    model = _bert(len(WORDS) + 5)
    ids = torch.randint(0, len(WORDS) + 5, (2, 6), generator=torch.Generator().manual_seed(0))
    task_loss = model(ids).last_hidden_state.square().mean()
    return {"model": model, "base_model": _bert(len(WORDS) + 5), "task_loss": task_loss}


def _tensors() -> dict:
    """``tensors``: (name, tensor) pairs to write."""
    return {"tensors": list(tiny_llama(0).items())}


def _state_dicts() -> dict:
    """``sd0`` (a base state dict) and two fine-tunes ``sd_a``, ``sd_b``."""
    sd0 = tiny_llama(0)
    return {"sd0": sd0, "sd_a": finetune(sd0, 1), "sd_b": finetune(sd0, 2)}


class _Split:
    """A prepared split: ``len()`` and ``batch(idx, device)`` giving a dict batch."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx, device=None) -> dict:
        ids = self.ids[torch.as_tensor(idx)].to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Head(torch.nn.Module):
    """A task's classifier on the pooled output (of a forward's output, or the tensor itself)."""

    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(16, classes)

    def forward(self, out):
        return self.lin(getattr(out, "pooler_output", out))


def _learned() -> dict:
    """A tiny BERT ``base``, two tasks' ``deltas`` (and ``d1``..``d3``), inputs and heads."""
    vocab = len(WORDS) + 5
    base = _bert(vocab)
    g = torch.Generator().manual_seed(0)
    names = [n for n, p in base.named_parameters() if p.dim() == 2 and "embeddings" not in n]

    def delta(seed):
        gen = torch.Generator().manual_seed(seed)
        params = dict(base.named_parameters())
        return {n: 0.02 * torch.randn(params[n].shape, generator=gen) for n in names}

    tasks = ["sst2", "mrpc"]
    ids = {t: torch.randint(0, vocab, (32, 8), generator=g) for t in tasks}
    labels = {t: torch.randint(0, 2, (32,), generator=g) for t in tasks}
    return {
        "base": base,
        "deltas": {t: delta(i) for i, t in enumerate(tasks)},
        "data": ids,
        "x": ids,
        "y": labels,
        "labeled": {t: (ids[t], labels[t]) for t in tasks},
        "unlabeled": {t: _Split(ids[t]) for t in tasks},
        "heads": {t: _Head(2, i) for i, t in enumerate(tasks)},
        "fwd": lambda m, b: m(**b).pooler_output if isinstance(b, dict) else m(b).pooler_output,
        "aug": lambda b: b,
        "d1": delta(1),
        "d2": delta(2),
        "d3": delta(3),
        "evaluate": lambda weights, seen=None: None,
    }


def _switch_features() -> dict:
    """Encoder features of a bank of examples per task, their task ids, and a query batch."""
    g = torch.Generator().manual_seed(0)
    return {
        "bank_features": torch.randn(30, 8, generator=g),
        "bank_task_ids": torch.arange(30) % 3,
        "query_features": torch.randn(4, 8, generator=g),
    }


NAMESPACES = {
    "adapters": _adapters,
    "tensors": _tensors,
    "state-dicts": _state_dicts,
    "learned": _learned,
    "switch-features": _switch_features,
}
