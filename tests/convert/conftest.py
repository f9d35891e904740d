"""Tiny Llama model dirs with a word-level tokenizer: a teacher and a depth-pruned student."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.convert.test_recursive import tiny_llama

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "and"]


def _tokenizer(path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny 6-layer Llama causal LM with a word-level tokenizer (vocab 64 ≥ the 15 tokens)."""
    path = tmp_path_factory.mktemp("llama")
    _tokenizer(path)
    tiny_llama(6).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student_dir(llama_dir, tmp_path_factory):
    """The teacher depth-pruned to layers 0, 2, 4, with the teacher's tokenizer."""
    from splice.convert import depth_prune

    path = tmp_path_factory.mktemp("student")
    _tokenizer(path)
    depth_prune(tiny_llama(6), [0, 2, 4]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    """60 word-salad documents of 6 words, one per line of a JSONL file."""
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, 10, (6,), generator=g)) for _ in range(60)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path
