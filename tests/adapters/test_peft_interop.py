"""PEFT LoRA directories both ways, checked against the real ``peft`` library (test-only dep)
on tiny randomly initialised HF BERT (Linear + Embedding + head) and GPT-2 (Conv1D) models."""

from __future__ import annotations

import pytest
import torch

from splice.adapters import inject, load_adapter, save_adapter

from .conftest import perturb

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _gpt2(cls, **options):
    cfg = transformers.GPT2Config(
        vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32, **options
    )
    torch.manual_seed(0)
    return cls(cfg).eval()


def tiny_gpt2():
    return _gpt2(transformers.GPT2LMHeadModel, bos_token_id=0, eos_token_id=0)


def tiny_gpt2_classifier():
    """GPT-2 Conv1D blocks and an nn.Linear head (``score``) in one model."""
    return _gpt2(transformers.GPT2ForSequenceClassification, num_labels=3, pad_token_id=0)


IDS = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(0))
CASES = {
    "bert": (
        tiny_bert,
        dict(targets=["query", "value", "word_embeddings"], modules_to_save=["classifier"]),
    ),
    "gpt2": (tiny_gpt2, dict(targets=["c_attn", "c_fc"])),
    "gpt2_conv1d_and_linear": (tiny_gpt2_classifier, dict(targets=["c_attn", "c_proj", "score"])),
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_splice_lora_loads_in_peft(name, rslora, tmp_path):
    build, kw = CASES[name]
    model = inject(build(), "lora", kw["targets"], modules_to_save=kw.get("modules_to_save", ()),
                   r=4, alpha=8, use_rslora=rslora)  # fmt: skip
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "a", format="peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    assert torch.allclose(logits(loaded), expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_lora_loads_in_splice(name, tmp_path):
    build, kw = CASES[name]
    config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=kw["targets"], modules_to_save=kw.get("modules_to_save")
    )
    pm = peft.get_peft_model(build(), config)
    perturb(pm)
    pm.eval()
    expected = logits(pm)
    pm.save_pretrained(tmp_path / "p")
    model = load_adapter(build(), tmp_path / "p")
    assert torch.allclose(logits(model), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(lora_bias=True), "lora_bias"), (dict(bias="all"), "trained biases")],
)
def test_peft_variants_splice_cannot_load_are_refused(options, message, tmp_path):
    from splice.errors import SpliceError

    config = peft.LoraConfig(r=4, target_modules=["query", "value"], **options)
    peft.get_peft_model(tiny_bert(), config).save_pretrained(tmp_path / "d")
    with pytest.raises(SpliceError, match=message):
        load_adapter(tiny_bert(), tmp_path / "d")
