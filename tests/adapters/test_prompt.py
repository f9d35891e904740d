"""Prompt tuning: virtual input tokens through the shared input hook; peft dirs both ways."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.adapters import adapter_layers, inject
from splice.adapters.prompt import PromptAdapter

from ._tiny_hf import assert_peft_both_ways, batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"prompt": {"tokens": 3}}


@pytest.mark.parametrize(("make", "task"), [(tiny_bert, "FEATURE_EXTRACTION"),
                                            (tiny_llama, "CAUSAL_LM")])  # fmt: skip
def test_peft_prompt_dirs_both_ways(make, task, tmp_path):
    """peft returns the virtual positions too: compared on the real tokens' positions."""
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    assert_peft_both_ways(make, config, tmp_path, virtual=4)


def test_text_init_takes_the_texts_token_embeddings(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    model = tiny_bert()
    inject(model, "prompt", ".*", tokens=5, init="text", init_text="good film",
           tokenizer=str(tmp_path / "tok"))  # fmt: skip
    (layer,) = adapter_layers(model).values()
    table = layer.base_layer.weight
    assert torch.equal(layer.adapter.prompt, table[torch.tensor([4, 5, 4, 5, 4])])


def test_outputs_line_up_with_the_inputs_unless_kept():
    base, x = tiny_bert(), batch()
    for keep, length in ((False, 7), (True, 10)):
        model = copy.deepcopy(base)
        inject(model, "prompt", ".*", tokens=3, keep_virtual=keep)
        assert output(model, x).shape[1] == length
    (adapter,) = [lay.adapter for lay in adapter_layers(model).values()]
    assert isinstance(adapter, PromptAdapter)


def test_greedy_generation_matches_the_forward():
    model, ids = tiny_llama(), batch()["input_ids"]
    inject(model, "prompt", ".*", tokens=3)
    got = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    for _ in range(2):
        ids = torch.cat([ids, output(model, {"input_ids": ids})[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, ids)
