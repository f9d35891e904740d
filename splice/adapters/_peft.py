"""PEFT LoRA directories in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

Out: any adapter whose ΔW is low-rank (LoRA, and MoS/NOLA/EPT materialised to plain LoRA,
spec §22.2 P13) becomes a LoRA that ``peft.PeftModel.from_pretrained`` loads. In: a PEFT LoRA
dir becomes splice LoRA state, so ``load_adapter`` injects and fills it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from splice.deltas import LowRank
from splice.errors import SpliceError

from .base import _matcher, _Record, adapter_layers

PREFIX = "base_model.model."
_FACTORS = {  # peft key suffix → splice LoRA parameter
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
}


def peft_files(
    model: nn.Module, record: _Record, base: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors for ``model``."""
    tensors: dict[str, Tensor] = {}
    ranks, scales, fan_in_fan_out = set(), set(), False
    for name, layer in adapter_layers(model).items():
        d = layer.delta()
        if not isinstance(d, LowRank):
            raise SpliceError(f"{record.method} has no low-rank ΔW to export as LoRA", where=name)
        ranks.add(d.rank)
        scales.add(d.scale)
        kind = layer.adapter.site.kind
        fan_in_fan_out |= kind == "conv1d_gpt2"
        a, b = (
            ("lora_embedding_A", "lora_embedding_B")
            if kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{name}.{a}"] = d.A
        tensors[f"{PREFIX}{name}.{b}"] = d.B
    if len(ranks) > 1 or len(scales) > 1:
        raise SpliceError(
            f"sites differ in rank {sorted(ranks)} or scale {sorted(scales)}",
            fix="export to splice format, or use one rank and scale for every site",
        )
    (r,), (scale,) = ranks, scales
    cfg = record.config
    if record.method == "lora":
        alpha, rslora = cfg.alpha, cfg.use_rslora
    else:
        alpha, rslora = scale * r, False
    for mod_name, module in model.named_modules():
        if mod_name and _matcher(record.modules_to_save)(mod_name):
            for key, t in module.state_dict().items():
                tensors[f"{PREFIX}{mod_name}.{key}"] = t
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base["base_model"],
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": cfg.dropout,
        "target_modules": list(adapter_layers(model)),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": record.modules_to_save or None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if base["model_class"]:
        config["auto_mapping"] = {"base_model_class": base["model_class"]}
    return config, {k: v.detach() for k, v in tensors.items()}


def read_peft(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT LoRA dir as (splice adapter record, splice adapter state).

    Raises:
        SpliceError: not a LoRA, a variant splice does not load (DoRA, rank/alpha patterns,
            trained biases), or pickle weights.
    """
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    unsupported = [
        key
        for key, ok in [
            ("peft_type", config.get("peft_type") == "LORA"),
            ("use_dora", not config.get("use_dora")),
            ("rank_pattern", not config.get("rank_pattern")),
            ("alpha_pattern", not config.get("alpha_pattern")),
            ("bias", config.get("bias", "none") == "none" and not config.get("lora_bias")),
        ]
        if not ok
    ]
    if unsupported:
        raise SpliceError(
            f"PEFT adapter uses {unsupported}, which splice's LoRA does not load",
            where=str(path),
            fix="re-save it as a plain LoRA (one rank and alpha, no DoRA, bias='none')",
        )
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise SpliceError(
            "no adapter_model.safetensors (pickle .bin adapters are not read)",
            where=str(path),
            fix="re-save with peft's save_pretrained(safe_serialization=True)",
        )
    state: dict[str, Tensor] = {}
    sites: set[str] = set()
    for key, t in load_file(str(weights)).items():
        key = key.removeprefix(PREFIX)
        for suffix, param in _FACTORS.items():
            if key.endswith(suffix):
                name = key.removesuffix(suffix)
                sites.add(name)
                state[f"{name}.adapter.{param}"] = t.reshape(t.shape[0], -1)
                break
        else:
            state[key] = t
    info = {
        "method": "lora",
        "config": {
            "r": config["r"],
            "alpha": config["lora_alpha"],
            "use_rslora": bool(config.get("use_rslora")),
            "dropout": config.get("lora_dropout", 0.0),
        },
        "targets": sorted(sites),
        "layers": None,
        "modules_to_save": [  # peft lists heads it may not have saved ("classifier", "score")
            m
            for m in config.get("modules_to_save") or []
            if any(f".{m}." in f".{k}" for k in state)
        ],
        "sites": sorted(sites),
        "base_model": config.get("base_model_name_or_path"),
        "model_class": (config.get("auto_mapping") or {}).get("base_model_class"),
    }
    return info, state
