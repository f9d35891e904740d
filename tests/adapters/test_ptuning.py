"""P-tuning: the prompt encoder's output is the prompt; saved materialised, as a prompt."""

from __future__ import annotations

import json

import torch

from splice.adapters import adapter_layers, inject, load_adapter, save_adapter

from ._tiny_hf import batch, output, tiny_bert

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
