"""``splice generate`` drives a converted recursive model (its KV cache, one layer per depth).

Run as a fresh process: in this test process ``splice.convert`` is already imported (and the
recursive class registered), which would hide a command that forgets to register it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from splice.convert import convert_recursive, depth_prune, save_recursive

from .conftest import WORDS
from .test_recursive import tiny_llama


def _tokenizer(path) -> None:
    """A word-level tokenizer with one word per id of the tiny model's 64 (every output decodes)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(64 - len(vocab))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    """A tiny recursive Llama (2 shared layers × 3 loops, rank-3 LoRA with non-zero B)."""
    path = tmp_path_factory.mktemp("rec")
    rec = convert_recursive(tiny_llama(seed=2), 2, "average", rank=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in rec.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    _tokenizer(path)
    save_recursive(rec, path, transformers.AutoTokenizer.from_pretrained(path))
    return path, rec


def _generate(model_dir, *extra: str) -> dict:
    argv = [sys.executable, "-m", "splice.cli", "generate", str(model_dir), "--prompt",
            "the cat sat on", "--temperature", "0", "--no-chat", "--max-new-tokens", "8",
            "--json", *extra]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_generate_decodes_a_recursive_dir_as_its_uncached_greedy_loop(rec_dir, tmp_path):
    path, rec = rec_dir
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = tok.encode("the cat sat on", add_special_tokens=False)
    with torch.no_grad():
        plain = rec.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             use_cache=False, pad_token_id=0)  # fmt: skip
    want = tok.decode(plain[0, len(prompt) :], skip_special_tokens=True)
    assert len(want.split()) == 8 and len(set(want.split())) >= 3  # not one repeated word
    assert _generate(path)["text"] == want
    # speculative decoding with a depth-pruned drafter: lossless, so the same text
    depth_prune(tiny_llama(seed=2), [0, 3]).save_pretrained(tmp_path / "draft")
    _tokenizer(tmp_path / "draft")
    spec = _generate(path, "--draft", str(tmp_path / "draft"), "--gamma", "3")
    assert spec["text"] == want and spec["lossless"] and spec["metrics"]["drafted"] > 0
