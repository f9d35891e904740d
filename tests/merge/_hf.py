"""Tiny random transformers models, built from configs in the test (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"hidden_size": 16, "intermediate_size": 32}),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {"hidden_size": 16, "intermediate_size": 32},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"hidden_size": 16, "intermediate_size": 32}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 16, "n_head": 2, "n_positions": 32}),
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        {"hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 32},
    ),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        {"hidden_size": 16, "intermediate_size": 32, "image_size": 8, "patch_size": 4},
    ),
    "t5": ("T5Config", "T5ForConditionalGeneration", {"d_model": 16, "d_kv": 8, "d_ff": 32}),
}
LAYERS = {"llama": 3, "mistral": 2, "qwen2": 2, "gpt2": 3, "bert": 2, "vit": 2, "t5": 2}


def tiny_hf(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random ``family`` model (its real class and tensor names) to ``path``."""
    import transformers

    cfg_name, model_name, kwargs = FAMILIES[family]
    layers = LAYERS[family]
    kw = dict(kwargs)
    if family == "gpt2":
        kw["n_layer"] = layers
    elif family == "t5":
        kw.update(num_layers=layers, num_decoder_layers=layers + 1, num_heads=2)
    else:
        kw.update(num_hidden_layers=layers, num_attention_heads=2)
        if family in ("llama", "mistral", "qwen2"):
            kw["num_key_value_heads"] = 1
    if family == "vit":
        kw["num_labels"] = 3
    else:
        kw.setdefault("vocab_size", 64)
        kw.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
        if family == "t5":
            kw["decoder_start_token_id"] = 0
    kw.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, model_name)(config)
    model.save_pretrained(str(path))
    return path
