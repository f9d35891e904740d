"""PEFT LoRA directories in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

Out: any adapter whose ΔW is low-rank (LoRA, and MoS/NOLA/EPT materialised to plain LoRA,
spec §22.2 P13) becomes a LoRA that ``peft.PeftModel.from_pretrained`` loads. In: a PEFT LoRA
dir becomes splice LoRA state, so ``load_adapter`` injects and fills it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from splice.deltas import LowRank
from splice.errors import SpliceError

from .base import _matcher, _Record, adapter_layers

PREFIX = "base_model.model."


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
    config = lora_config(
        r=r,
        alpha=alpha,
        targets=list(adapter_layers(model)),
        use_rslora=rslora,
        dropout=cfg.dropout,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=record.modules_to_save or None,
        base_model=base["base_model"],
        model_class=base["model_class"],
    )
    return config, {k: v.detach() for k, v in tensors.items()}


def lora_config(
    *,
    r: int,
    alpha: float,
    targets: list[str],
    use_rslora: bool = False,
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
    modules_to_save: list[str] | None = None,
    base_model: str | None = None,
    model_class: str | None = None,
) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for a plain LoRA (one rank and alpha for every site)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "lora_dropout": dropout,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if model_class:
        config["auto_mapping"] = {"base_model_class": model_class}
    return config


def read_peft(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT LoRA dir as (splice adapter record, splice adapter state), via :mod:`splice.io`.

    Raises:
        SpliceError: not a LoRA (or DoRA, pickle weights: from the reader), per-module ranks or
            scales (``rank_pattern``/``alpha_pattern``), or trained biases.
    """
    from splice.deltas import lora_scale
    from splice.io import open_checkpoint
    from splice.io.peft import peft_full_tensors, peft_lowrank_deltas

    ckpt = open_checkpoint(path)
    config = ckpt.config or {}
    deltas = peft_lowrank_deltas(ckpt)
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    uniform = {(d.rank, d.scale) for d in deltas.values()} == {(r, lora_scale(alpha, r, rslora))}
    if not uniform or config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise SpliceError(
            "PEFT adapter has per-module ranks/alphas or trained biases, which splice's LoRA "
            "does not load",
            where=str(path),
            fix="re-save it as a plain LoRA (one r and lora_alpha, bias='none')",
        )
    state = peft_full_tensors(ckpt)  # modules_to_save, keyed like splice's own
    sites = sorted(name.removesuffix(".weight") for name in deltas)
    for site, d in zip(sites, (deltas[f"{s}.weight"] for s in sites), strict=True):
        state[f"{site}.adapter.lora_A"] = d.A.reshape(d.rank, -1)
        state[f"{site}.adapter.lora_B"] = d.B.reshape(-1, d.rank)
    saved = config.get("modules_to_save") or []  # peft lists heads it may not have saved
    info = {
        "method": "lora",
        "config": {
            "r": r,
            "alpha": alpha,
            "use_rslora": rslora,
            "dropout": config.get("lora_dropout", 0.0),
        },
        "targets": sites,
        "layers": None,
        "modules_to_save": [m for m in saved if any(f".{m}." in f".{k}" for k in state)],
        "sites": sites,
        "base_model": config.get("base_model_name_or_path"),
        "model_class": (config.get("auto_mapping") or {}).get("base_model_class"),
    }
    return info, state
