"""P-tuning: the prompt encoder's output is the prompt; saved materialised, as a prompt."""

from __future__ import annotations

import json

import pytest
import torch

from splice.adapters import adapter_layers, inject, load_adapter, save_adapter

from ._tiny_hf import assert_peft_both_ways, batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"ptuning": {"tokens": 3, "hidden": 8}}


def test_encoder_output_is_the_prompt_and_save_materialises_it(tmp_path):
    model, x = tiny_bert(), batch()
    inject(model, "ptuning", ".*", tokens=3, hidden=8)
    (layer,) = adapter_layers(model).values()
    a = layer.adapter
    h = torch.relu(a.encoder[0](a.prompt))
    ref = a.encoder[4](torch.relu(a.encoder[2](h)))
    assert torch.allclose(a.embeddings(), ref)
    y = output(model, x)
    save_adapter(model, tmp_path / "a")
    info = json.loads((tmp_path / "a" / "splice_adapter.json").read_text())
    assert info["method"] == "prompt" and "hidden" not in info["config"]
    assert torch.equal(output(load_adapter(tiny_bert(), tmp_path / "a"), x), y)


@pytest.mark.parametrize(("make", "task"), [(tiny_bert, "FEATURE_EXTRACTION"),
                                            (tiny_llama, "CAUSAL_LM")])  # fmt: skip
def test_peft_ptuning_dirs_both_ways(make, task, tmp_path):
    """peft's P_TUNING dir (its encoder's output, saved) loads in splice, and back in peft."""
    peft = pytest.importorskip("peft")
    config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=8)
    assert_peft_both_ways(make, config, tmp_path, virtual=3)


def test_a_trained_splice_ptuning_loads_in_peft(tmp_path):
    """splice's encoder, moved off its init, saved in peft's format: peft gives its outputs."""
    peft = pytest.importorskip("peft")
    model, x = tiny_bert(), batch()
    inject(model, "ptuning", ".*", tokens=3, hidden=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    save_adapter(model, tmp_path / "p", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "p").eval()
    keep = x["attention_mask"].bool()
    assert torch.allclose(output(theirs, x)[:, 3:][keep], output(model, x)[keep], atol=1e-5)
