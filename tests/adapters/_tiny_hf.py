"""Tiny random BERT and Llama (GQA) models for the unified-view adapter tests."""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM


def tiny_bert(layers: int = 2, heads: int = 2, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=32,
                     max_position_embeddings=64)  # fmt: skip
    return BertModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=32,
                      max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (3, 7) and a padding mask with one short row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_peft_both_ways(make, config, tmp_path, virtual: int = 0) -> None:
    """peft's dir loads into splice and splice's peft dir into peft, outputs equal to peft's
    on the real tokens (``virtual``: leading positions peft returns and splice drops)."""
    import peft

    from splice.adapters import load_adapter, save_adapter

    base, x = make(), batch()
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    want = output(theirs, x)[:, virtual:]
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    keep = x["attention_mask"].bool()  # padded positions are not compared
    assert torch.allclose(output(ours, x)[keep], want[keep], atol=1e-5)
    save_adapter(ours, tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert torch.allclose(output(back, x)[:, virtual:][keep], want[keep], atol=1e-5)
