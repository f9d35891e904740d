"""A tiny random Llama with a word-level tokenizer, and a synthetic generation task."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = {
    "animal": ["cat", "dog", "bird", "fish"],
    "vehicle": ["car", "bus", "train", "boat"],
    "meal": ["bread", "rice", "soup", "cake"],
}
FILLER = ["the", "a", "it", "was", "this", "that", "day", "very", "quite"]
INSTRUCTION = "which kind is it ?"
CHAT = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<|im_end|>", "<|im_start|>", "system", "user", "assistant",
             "Input:", "Answer:", "which", "kind", "is", "?", *FILLER,
             *(w for ws in WORDS.values() for w in ws), *WORDS]  # fmt: skip
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT
    return fast


def examples(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    inputs, answers = [], []
    for i in range(n):
        kind = sorted(WORDS)[i % len(WORDS)]
        inputs.append(f"{rng.choice(FILLER)} {rng.choice(WORDS[kind])}")
        answers.append(kind)
    return inputs, answers


def gen_task(name: str = "syn", labels: bool = True):
    from splice.data.llm_tasks import GenTask

    return GenTask(
        name, INSTRUCTION, tuple(sorted(WORDS)) if labels else None,
        read=lambda: examples(240, 0), description="synthetic: the kind of the one noun",
    )  # fmt: skip


def tiny_llama(root: Path, chat: bool = False) -> Path:
    """Save a random 2-layer Llama (hidden 64) and its tokenizer under ``root``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(chat)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root
