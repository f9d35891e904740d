"""peft LoRA variants that are not one weight delta of the original base are refused the same
way by ``load_deltas`` (the merge path) and ``load_adapter``; the ones that are load exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch

from splice.adapters import load_adapter
from splice.deltas import load_deltas
from splice.errors import SpliceError
from splice.io import open_checkpoint

from .test_peft_dirs import _tiny_bert

TARGETS = ["query", "value"]


def _both_refuse(adapter: Path, message: str) -> None:
    with pytest.raises(SpliceError, match=message):
        load_deltas(adapter)
    with pytest.raises(SpliceError, match=message):
        load_adapter(_tiny_bert(), adapter)


def _saved(tmp_path: Path, config: peft.LoraConfig, model=None) -> Path:
    pm = peft.get_peft_model(model if model is not None else _tiny_bert(), config)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_alora_is_refused(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, target_modules=TARGETS, alora_invocation_tokens=[5, 6])
    _both_refuse(_saved(tmp_path, config), "aLoRA adapter")


def test_lora_bias_is_refused_by_both_paths(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True)
    adapter = _saved(tmp_path, config)
    assert any(n.endswith("lora_B.bias") for n in open_checkpoint(adapter).names())
    _both_refuse(adapter, "lora_bias=True")


def test_a_lora_b_bias_without_the_config_flag_is_refused(tmp_path: Path) -> None:
    adapter = _saved(tmp_path, peft.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"lora_bias": False}))
    _both_refuse(adapter, "lora_bias=True")


def test_pissa_adapter_fits_a_modified_base_and_is_refused(tmp_path: Path) -> None:
    base = _tiny_bert()
    original = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    pm = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="pissa")
    )
    residual = pm.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.allclose(residual, original)  # peft rewrote the base weight
    pm.save_pretrained(tmp_path / "adapter")
    _both_refuse(tmp_path / "adapter", "fits a modified base")


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora", "loftq", "corda", "lora_ga"])
def test_every_base_modifying_init_is_refused(tmp_path: Path, init: str) -> None:
    adapter = _saved(tmp_path, peft.LoraConfig(r=2, target_modules=TARGETS))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"init_lora_weights": init}))
    _both_refuse(adapter, f"init_lora_weights='{init}'")


def _randomize(pm: torch.nn.Module, which: str, scale: float = 1.0) -> None:
    """Stand-in for training: add noise to every ``which`` (``lora_``, ``lora_B``) tensor."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if which in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _assert_original_base_plus_deltas(adapter: Path, base_sd: dict, merged: dict) -> None:
    deltas = load_deltas(adapter, base=base_sd)
    assert deltas
    for name in base_sd:
        got = base_sd[name] + deltas[name].materialize() if name in deltas else base_sd[name]
        assert torch.allclose(got, merged[name], atol=1e-5, rtol=0), name


def test_pissa_converted_for_the_original_base_loads_exactly(tmp_path: Path) -> None:
    """The fix the error gives: peft's conversion is a LoRA of the original base."""
    original = _tiny_bert()
    base_sd = copy.deepcopy(original.state_dict())
    config = peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="pissa")
    pm = peft.get_peft_model(original, config)
    pm.save_pretrained(tmp_path / "init")
    _randomize(pm, "lora_", 0.1)
    pm.save_pretrained(
        tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    merged = pm.merge_and_unload().state_dict()  # residual base + trained adapter
    _assert_original_base_plus_deltas(tmp_path / "out", base_sd, merged)


def test_eva_adapter_fits_the_original_base_and_loads(tmp_path: Path) -> None:
    """EVA only initialises lora_A from activations; peft leaves the base as it is."""
    model = _tiny_bert()
    base_sd = copy.deepcopy(model.state_dict())
    config = peft.LoraConfig(
        r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.0)
    )
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 40, (4, 8), generator=g)} for _ in range(3)]
    peft.initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    _randomize(pm, "lora_B")
    pm.save_pretrained(tmp_path / "adapter")
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"]
        == "eva"
    )
    _assert_original_base_plus_deltas(
        tmp_path / "adapter", base_sd, pm.merge_and_unload().state_dict()
    )
