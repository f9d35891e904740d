"""Adapters saved by the real ``peft`` library load as deltas equal to peft's own merge."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

from splice.deltas import LowRank, load_deltas
from splice.errors import SpliceError
from splice.io import CheckpointWriter, open_checkpoint


def _save_base(model: nn.Module, dest: Path) -> None:
    with CheckpointWriter(dest) as w:
        for k, v in model.state_dict().items():
            w.write(k, v)


def _check_equal_to_peft_merge(base_model: nn.Module, config, tmp_path: Path) -> dict:
    import copy

    torch.manual_seed(1)
    base_copy = copy.deepcopy(base_model)
    _save_base(base_copy, tmp_path / "base")
    pm = peft.get_peft_model(base_model, config)
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload().state_dict()
    base = open_checkpoint(tmp_path / "base")
    deltas = load_deltas(tmp_path / "adapter", base=base)
    assert deltas, "no deltas loaded"
    for name in base:
        expect = merged[name]
        got = base[name] + deltas[name].materialize() if name in deltas else base[name]
        assert torch.allclose(got, expect, atol=1e-6, rtol=0), name
    return deltas


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def test_bert_lora_with_rslora_and_patterns_and_modules_to_save(tmp_path: Path) -> None:
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "word_embeddings"],
        init_lora_weights=False,
        use_rslora=True,
        modules_to_save=["classifier"],
        rank_pattern={"layer.1.attention.self.value": 2},
        alpha_pattern={"query": 3},
    )
    deltas = _check_equal_to_peft_merge(_tiny_bert(), cfg, tmp_path)
    q = deltas["bert.encoder.layer.0.attention.self.query.weight"]
    assert isinstance(q, LowRank) and q.rank == 4 and q.scale == pytest.approx(3 / 2)
    assert deltas["bert.encoder.layer.1.attention.self.value.weight"].rank == 2
    emb = deltas["bert.embeddings.word_embeddings.weight"]
    assert isinstance(emb, LowRank) and emb.transpose and emb.shape == (40, 16)
    assert "classifier.weight" in deltas


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=30, n_positions=16)
    )
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    deltas = _check_equal_to_peft_merge(model, cfg, tmp_path)
    d = deltas["transformer.h.0.attn.c_attn.weight"]
    assert d.transpose and d.shape == (16, 48)


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.c1(x))


def test_conv2d_kxk_and_1x1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c1", "c2"], init_lora_weights=False)
    deltas = _check_equal_to_peft_merge(_Convs(), cfg, tmp_path)
    assert deltas["c1.weight"].shape == (8, 3, 3, 3)
    assert deltas["c2.weight"].shape == (4, 8, 1, 1)


def _adapter(tmp_path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    d = tmp_path / "ad"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, d / "adapter_model.safetensors")
    return d


_A = "base_model.model.lin.lora_A.weight"
_B = "base_model.model.lin.lora_B.weight"


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        ({"r": 2, "lora_alpha": 2}, {_A: torch.ones(2, 4)}, "has lora_A only"),
        ({"r": 2, "lora_alpha": 2}, {_A: torch.ones(2, 4), _B: torch.ones(3, 3)}, "rank mismatch"),
        ({"r": 4, "lora_alpha": 2}, {_A: torch.ones(2, 4), _B: torch.ones(3, 2)}, "says 4"),
        (
            {"r": 0, "lora_alpha": 2},
            {_A: torch.ones(2, 4), _B: torch.ones(3, 2)},
            "positive integer",
        ),
        ({"r": 2, "lora_alpha": 2, "peft_type": "IA3"}, {_A: torch.ones(2, 4)}, "not LoRA"),
        ({"r": 2, "lora_alpha": 2, "use_dora": True}, {_A: torch.ones(2, 4)}, "DoRA"),
    ],
)
def test_invalid_adapters_are_refused(
    tmp_path: Path, cfg: dict, tensors: dict, message: str
) -> None:
    d = _adapter(tmp_path, cfg, tensors)
    with pytest.raises(SpliceError, match=message):
        load_deltas(d)


def test_adapter_target_absent_from_base_or_wrong_shape(tmp_path: Path) -> None:
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 2}, {_A: torch.ones(2, 4), _B: torch.ones(3, 2)})
    assert load_deltas(d)["lin.weight"].shape == (3, 4)
    with pytest.raises(SpliceError, match="not in the base"):
        load_deltas(d, base={"other.weight": torch.zeros(3, 4)})
    with pytest.raises(SpliceError, match="has shape"):
        load_deltas(d, base={"lin.weight": torch.zeros(4, 4)})


def test_invalid_adapter_config_json(tmp_path: Path) -> None:
    d = _adapter(tmp_path, {}, {_A: torch.ones(2, 4)})
    (d / "adapter_config.json").write_text("{nope")
    with pytest.raises(SpliceError, match="invalid JSON"):
        load_deltas(d)


def test_saved_base_layer_maps_to_the_base_tensor_name(tmp_path: Path) -> None:
    d = _adapter(
        tmp_path,
        {"r": 2, "lora_alpha": 2},
        {
            _A: torch.ones(2, 4),
            _B: torch.ones(3, 2),
            "base_model.model.emb.base_layer.weight": torch.full((5, 3), 2.0),
        },
    )
    deltas = load_deltas(d, base={"lin.weight": torch.zeros(3, 4), "emb.weight": torch.ones(5, 3)})
    assert torch.equal(deltas["emb.weight"].materialize(), torch.ones(5, 3))
