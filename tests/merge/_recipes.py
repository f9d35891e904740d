"""Shared pieces of the recipe tests: a base with fine-tunes on disk, recipe files from
templates, output dirs read back, and a word-level tokenizer saved beside a model."""

from __future__ import annotations

from pathlib import Path

from splice.io import open_checkpoint
from tests.merge._ckpt import finetune, save, tiny_llama


def base_and_finetunes(root: Path, n: int = 2) -> tuple[dict[str, Path], dict, list[dict]]:
    """``({"base": dir, "ft0": dir, …}, base state dict, fine-tune state dicts)`` in ``root``."""
    base = tiny_llama(0)
    fts = [finetune(base, s) for s in range(n)]
    paths = {"base": save(base, root / "base")}
    for i, ft in enumerate(fts):
        paths[f"ft{i}"] = save(ft, root / f"ft{i}")
    return paths, base, fts


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yml", **paths) -> Path:
    """``text`` with ``{key}`` replaced by ``paths[key]``, written to ``tmp_path / name``."""
    p = tmp_path / name
    p.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    return p


def load_dir(path: Path) -> dict:
    """Every tensor of a written model dir."""
    ckpt = open_checkpoint(path)
    return {n: ckpt[n] for n in ckpt}


def save_word_tokenizer(path: Path, words: list[str]) -> Path:
    """A word-level fast tokenizer over ``words`` (``<pad>``, ``<s>`` special) in ``path``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")
    fast.save_pretrained(str(path))
    return path
