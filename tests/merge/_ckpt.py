"""Tiny Llama-named checkpoints on disk for the merge engine and recipe tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from splice.io import CheckpointWriter

LAYERS = 3


def tiny_llama(seed: int = 0, layers: int = LAYERS, hidden: int = 8, vocab: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q", "k", "v", "o"):
            sd[f"{p}self_attn.{m}_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[f"{p}mlp.up_proj.weight"] = torch.randn(12, hidden, generator=g)
        sd[f"{p}mlp.down_proj.weight"] = torch.randn(hidden, 12, generator=g)
        sd[f"{p}input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["model.steps"] = torch.arange(5)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return sd


def finetune(sd: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in sd.items()
    }


def config(layers: int = LAYERS, model_type: str = "llama") -> dict:
    return {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": 8,
    }


def save(sd: dict, path: Path, *, shard: str | int = "5GB", cfg: dict | None = None) -> Path:
    src = path.parent / f".{path.name}-aux"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(cfg or config()))
    with CheckpointWriter(path, max_shard_size=shard, copy_files_from=src) as w:
        for k, v in sd.items():
            w.write(k, v)
    return path


def lora_adapter(path: Path, base: dict, targets: list[str], r: int = 2, seed: int = 0) -> dict:
    """A PEFT LoRA dir on ``targets``; returns the dense ΔW per base tensor name."""
    g = torch.Generator().manual_seed(seed)
    alpha = 4
    tensors, deltas = {}, {}
    for name in targets:
        module = name.removesuffix(".weight")
        out_f, in_f = base[name].shape
        a = torch.randn(r, in_f, generator=g)
        b = torch.randn(out_f, r, generator=g)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        deltas[name] = (b @ a) * (alpha / r)
    path.mkdir(parents=True)
    mods = sorted({t.split(".")[-2] for t in targets})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": mods}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return deltas
