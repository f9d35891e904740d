"""Prefix tuning (spec peft.md §16): the gated-adapter view, peft dirs, saving, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from splice.adapters import adapter_layers, inject, load_adapter, save_adapter
from splice.errors import SpliceError

from ._tiny_hf import assert_peft_both_ways, batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"prefix": {"tokens": 3, "hidden": 8}}


def test_one_head_is_a_gated_adapter():
    """head = (1−λ)·Attn(q, K, V) + λ·softmax(q P_kᵀ) P_v with λ from the two partition sums."""
    model, x = tiny_bert(layers=1, heads=1), batch()
    x["attention_mask"][:] = 1
    inject(model, "prefix_nomlp", ".*", tokens=3)
    (layer,) = adapter_layers(model).values()
    attn, seen = layer.base_layer, {}
    attn.query.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    layer.register_forward_hook(lambda m, a, kw, y: seen.update(head=y[0]), with_kwargs=True)
    output(model, x)
    h, scale = seen["h"], 16**-0.5
    q, k, v = attn.query(h), attn.key(h), attn.value(h)
    pk, pv = layer.adapter.keys, layer.adapter.values
    sp, sc = q @ pk.T * scale, q @ k.transpose(1, 2) * scale
    zp, zc = sp.exp().sum(-1, keepdim=True), sc.exp().sum(-1, keepdim=True)
    lam = zp / (zp + zc)
    ref = (1 - lam) * (sc.softmax(-1) @ v) + lam * (sp.softmax(-1) @ pv)
    assert torch.allclose(seen["head"], ref, atol=1e-5)
    assert 0.05 < lam.mean() < 0.95  # both branches matter in this check


@pytest.mark.parametrize(("make", "task"), [(tiny_bert, "FEATURE_EXTRACTION"),
                                            (tiny_llama, "CAUSAL_LM")])  # fmt: skip
def test_peft_prefix_dirs_both_ways(make, task, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4)
    assert_peft_both_ways(make, config, tmp_path)


def test_save_materialises_the_prefixes_and_drops_the_mlp(tmp_path):
    model, x = tiny_bert(), batch()
    inject(model, "prefix", ".*", tokens=3, hidden=8)
    y = output(model, x)
    save_adapter(model, tmp_path / "a")
    info = json.loads((tmp_path / "a" / "splice_adapter.json").read_text())
    assert info["method"] == "prefix_nomlp" and info["config"]["reparam"] is False
    from safetensors.torch import load_file

    names = sorted(load_file(str(tmp_path / "a" / "splice_adapter.safetensors")))
    assert len(names) == 4 and all(n.endswith((".keys", ".values")) for n in names)
    fresh = load_adapter(tiny_bert(), tmp_path / "a")
    assert torch.equal(output(fresh, x), y)


def test_greedy_generation_matches_the_forward():
    """generate() fills the prefix into its cache once; each token = argmax of a full forward."""
    model, x = tiny_llama(), {"input_ids": batch()["input_ids"]}
    inject(model, "prefix_nomlp", ".*", tokens=4)
    got = model.generate(**x, max_new_tokens=3, do_sample=False)
    ids = x["input_ids"]
    for _ in range(3):
        ids = torch.cat([ids, output(model, {"input_ids": ids})[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, ids)


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def test_attention_class_without_the_hook_is_an_error_naming_the_module():
    with pytest.raises(SpliceError, match=r"GPT2Attention has no splice prefix hook") as e:
        inject(_gpt2(), "prefix", ["c_attn"])
    assert "h.0.attn" in str(e.value) and "\n" not in str(e.value)


def test_prefix_covers_every_layer():
    with pytest.raises(SpliceError, match="every attention layer"):
        inject(tiny_bert(), "prefix", ".*", layers=[0])


def test_cli_train_on_an_attention_class_without_the_hook_exits_1(tmp_path, monkeypatch, capsys):
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    from tests.cli._run import run_cli

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "m")
    cfg = GPT2Config(vocab_size=6, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "m")
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": "the film"}) + "\n" for _ in range(8)))
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "m"), str(data),
                           "--out", str(out), "--method", "prefix", "--steps", "1")  # fmt: skip
    assert code == 1
    assert "GPT2Attention has no splice prefix hook" in err and "transformer.h.0.attn" in err
    assert not (out / "adapter").exists()
