"""Adapter targets mapped across a task-head wrapper prefix (``bert.``, ``model.`` …), as
``transformers`` maps a checkpoint between a bare model class and its task-head class."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import transformers

from splice.deltas import load_deltas
from splice.deltas.wrapper import WrapperMap, wrapper_map
from splice.errors import SpliceError

BARE = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"]
WRAPPED = [f"bert.{n}" for n in BARE]


@pytest.mark.parametrize(
    ("targets", "base", "model_type", "expected"),
    [
        (WRAPPED[1:], BARE, None, WrapperMap("bert", strip=True)),
        (BARE[1:], [*WRAPPED, "classifier.weight"], None, WrapperMap("bert", strip=False)),
        (
            ["layers.0.q_proj.weight"],
            ["model.layers.0.q_proj.weight"],
            "llama",
            WrapperMap("model", False),
        ),
        (["m.layers.0.q.weight"], ["layers.0.q.weight"], "my-model", None),  # 'm' is no wrapper
        (["my_model.x.weight"], ["x.weight"], "my-model", WrapperMap("my_model", strip=True)),
        (BARE[1:], BARE, None, None),  # every target is a base name: nothing to map
        ([*WRAPPED[1:], "decoder.x.weight"], BARE, None, None),  # one target resolves nowhere
        # two prefixes would both fit: ambiguous, so no mapping
        (["x.weight"], ["bert.x.weight", "model.x.weight"], None, None),
        # stripping would send two targets to one base name
        (["bert.x.weight", "x.weight"], ["x.weight"], None, None),
    ],
)
def test_wrapper_map(targets, base, model_type, expected) -> None:
    assert wrapper_map(targets, base, model_type) == expected


def test_map_and_to_base() -> None:
    strip = WrapperMap("bert", strip=True)
    assert strip("bert.encoder.w") == "encoder.w" and strip("classifier.w") == "classifier.w"
    add = WrapperMap("model", strip=False)
    assert add.to_base("layers.0.w", {"model.layers.0.w"}) == "model.layers.0.w"
    assert add.to_base("lm_head.weight", {"model.layers.0.w"}) == "lm_head.weight"
    assert "'bert.' stripped" in strip.describe() and "'model.' added" in add.describe()


def _bert(cls):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return cls(cfg).eval()


def _peft(model, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False
    )
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", pm.merge_and_unload().state_dict()


def test_adapter_of_the_head_class_on_a_bare_base(tmp_path: Path) -> None:
    model = _bert(transformers.BertForSequenceClassification)
    bare = {k.removeprefix("bert."): v for k, v in copy.deepcopy(model.state_dict()).items()}
    bare = {k: v for k, v in bare.items() if not k.startswith("classifier.")}
    adapter, merged = _peft(model, tmp_path)
    deltas = load_deltas(adapter, base=bare)
    assert sorted(deltas) == sorted(
        f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")
    )
    for name, d in deltas.items():
        assert torch.allclose(bare[name] + d.materialize(), merged[f"bert.{name}"], atol=1e-6)


def test_adapter_of_the_bare_class_on_a_head_checkpoint(tmp_path: Path) -> None:
    model = _bert(transformers.BertModel)
    head = {f"bert.{k}": v for k, v in copy.deepcopy(model.state_dict()).items()}
    head["classifier.weight"] = torch.zeros(3, 16)
    adapter, merged = _peft(model, tmp_path)
    deltas = load_deltas(adapter, base=head)
    assert all(n.startswith("bert.encoder.") for n in deltas) and len(deltas) == 4
    for name, d in deltas.items():
        expect = merged[name.removeprefix("bert.")]
        assert torch.allclose(head[name] + d.materialize(), expect, atol=1e-6)


def test_target_under_no_wrapper_names_the_prefixes_tried(tmp_path: Path) -> None:
    adapter, _ = _peft(_bert(transformers.BertModel), tmp_path)
    base = {"roberta.encoder.layer.0.attention.self.query.weight": torch.zeros(16, 16)}
    with pytest.raises(SpliceError, match="nor under a task-head wrapper prefix"):
        load_deltas(adapter, base=base)
