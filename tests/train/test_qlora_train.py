"""``splice train --base-bits``: LoRA over a quantized frozen base, end to end (issue #28 d4)."""

from __future__ import annotations

import json

import pytest
import torch

from splice.train import TrainConfig, train
from tests.train.test_train import bert_dir, csv_file  # noqa: F401 (fixtures)


def test_train_on_a_4_bit_base_writes_the_adapter(bert_dir, csv_file, tmp_path, monkeypatch):  # noqa: F811
    import splice.compress.qbase as qbase

    quantized = {}
    real = qbase.quantize_base

    def spy(model, bits):
        names = real(model, bits)
        quantized.update({n: model.get_submodule(n).qweight.clone() for n in names})
        quantized["model"] = model
        return names

    monkeypatch.setattr(qbase, "quantize_base", spy)
    monkeypatch.setattr("splice.compress.quantize_base", spy)
    cfg = TrainConfig(model=bert_dir, data=str(csv_file), out=tmp_path / "o", steps=6,
                      batch_size=8, lr=5e-3, progress=False, base_bits=4)  # fmt: skip
    train(cfg)
    model = quantized.pop("model")
    assert any(n.endswith("query.base_layer") for n in quantized)
    for name, codes in quantized.items():  # the codes did not move during training
        layer = model.get_submodule(name)
        assert torch.equal(layer.qweight, codes) and int(layer.qweight.max()) <= 15
    info = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert info["config"]["base_bits"] == 4
    assert (tmp_path / "o" / "adapter" / "splice_adapter.safetensors").is_file()


def test_base_bits_need_an_adapter_method(bert_dir, csv_file, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="--base-bits quantizes the frozen base"):
        TrainConfig(model=bert_dir, data=str(csv_file), out=tmp_path, method="full", base_bits=4)
