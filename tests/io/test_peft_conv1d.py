"""GPT-2 dirs that adapt ``Conv1D`` and ``nn.Linear`` modules together: the transpose is decided
per module (peft saves one ``fan_in_fan_out`` flag, the last module's), checked against peft."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers

from splice.deltas import load_deltas
from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.io.peft import conv1d_modules

# c_attn (16, 48) and mlp.c_proj (64, 16) are Conv1D; attn.c_proj (16, 16) is a square Conv1D,
# the one a wrong transpose leaves the right shape; score (3, 16) is an nn.Linear head.
TARGETS = ["c_attn", "c_proj", "score"]


def _gpt2() -> transformers.GPT2ForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=3,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(cfg).eval()


def _peft_dir(tmp_path: Path, model, targets=TARGETS) -> tuple[Path, dict[str, torch.Tensor]]:
    """A peft LoRA on ``targets`` (random A and B), saved; and peft's merge of it."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(model, config)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", pm.merge_and_unload().state_dict()


def _assert_equal_to(merged: dict[str, torch.Tensor], base, deltas=None) -> None:
    """``base`` (+ ``deltas``) equals peft's merge on every tensor; a ``deltas`` dict must
    cover the square Conv1D and the Linear head."""
    if deltas is not None:
        assert {"score.weight", "transformer.h.0.attn.c_proj.weight"} <= set(deltas)
    for name in base:
        got = base[name] + deltas[name].materialize() if name in (deltas or {}) else base[name]
        assert torch.allclose(got, merged[name], atol=1e-6, rtol=0), name


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(base dir with config.json, adapter dir that names no local base, peft's merge)."""
    model = _gpt2()
    model.save_pretrained(tmp_path / "base")
    adapter, merged = _peft_dir(tmp_path, model)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False  # peft saved the last module's (score) value
    assert not config["base_model_name_or_path"]
    return tmp_path / "base", adapter, merged


def test_mixed_conv1d_and_linear_equal_peft_merge_with_the_base(mixed) -> None:
    base_dir, adapter, merged = mixed
    base = open_checkpoint(base_dir)
    deltas = load_deltas(adapter, base=base)
    assert deltas["transformer.h.0.attn.c_proj.weight"].transpose
    assert not deltas["score.weight"].transpose
    _assert_equal_to(merged, base, deltas)


def test_square_conv1d_beside_a_linear_head(tmp_path: Path) -> None:
    """Only the square ``attn.c_proj`` and the head: every shape fits either way round."""
    model = _gpt2()
    model.save_pretrained(tmp_path / "base")
    adapter, merged = _peft_dir(tmp_path, model, ["attn.c_proj", "score"])
    base = open_checkpoint(tmp_path / "base")
    _assert_equal_to(merged, base, load_deltas(adapter, base=base))


def test_mixed_dir_naming_its_local_base_needs_no_base(tmp_path: Path) -> None:
    _gpt2().save_pretrained(tmp_path / "base")
    model = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "base")
    adapter, merged = _peft_dir(tmp_path, model.eval())
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    _assert_equal_to(merged, open_checkpoint(tmp_path / "base"), load_deltas(adapter))


def test_mixed_dir_without_any_base_config_is_refused(mixed) -> None:
    _, adapter, _ = mixed
    with pytest.raises(SpliceError, match=r"cannot tell whether .* is a GPT-2 Conv1D"):
        load_deltas(adapter)


def test_merge_of_a_mixed_dir_equals_peft_merge(mixed, tmp_path: Path) -> None:
    from splice.merge import merge

    base_dir, adapter, merged = mixed
    recipe = {
        "method": "task_arithmetic",
        "base": str(base_dir),
        "models": [str(adapter)],
        "params": {"lambda": 1.0},
    }
    out = merge(recipe, tmp_path / "out", checksums=False)
    _assert_equal_to(merged, open_checkpoint(out))


def test_splice_written_mixed_dir_reloads_in_peft_and_in_splice(tmp_path: Path) -> None:
    from splice.adapters import inject, save_adapter

    _gpt2().save_pretrained(tmp_path / "base")
    model = inject(_gpt2(), "lora", TARGETS, r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "a", format="peft", base_model=tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    merged = loaded.merge_and_unload().state_dict()
    _assert_equal_to(merged, open_checkpoint(tmp_path / "base"), load_deltas(tmp_path / "a"))


@pytest.mark.parametrize(
    ("model_type", "flag", "expected"),
    [
        ("gpt2", False, {"h.0.attn.c_attn", "h.0.mlp.c_proj"}),
        ("gpt_bigcode", False, set()),  # its c_attn / c_proj are nn.Linear
        (None, True, {"h.0.attn.c_attn", "h.0.mlp.c_proj"}),
        (None, False, None),  # GPT-2 with a Linear head, or GPT-BigCode: cannot tell
    ],
)
def test_conv1d_modules_rule(model_type, flag, expected) -> None:
    modules = ["h.0.attn.c_attn", "h.0.mlp.c_proj", "score"]
    assert conv1d_modules(modules, model_type, flag) == expected
    assert conv1d_modules(["h.0.attn.c_attn"], None, False) == set()  # only GPT-2 names, False
