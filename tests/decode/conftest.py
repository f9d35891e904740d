"""Tiny random-init Llama models for the decoding tests (nothing downloaded)."""

from __future__ import annotations

import torch

# a word-level vocabulary for the text-level tests (AMBEDKAR, splice generate)
WORDS = ["<unk>", "the", "violent", "peaceful", "man", "was", "Hindu", "Muslim", "rich", "poor",
         "and", "very", "[MASK]", "a", "said", "it", "good", "bad", "</s>"]  # fmt: skip


def tiny_llama(vocab: int = 8, layers: int = 3, seed: int = 0, sharpen: float = 1.0):
    """A random ``LlamaForCausalLM``; ``sharpen`` scales the head so distributions are peaky."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` (ids in list order), whitespace-joined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])
