"""Tokenizer surgery (mergekit ``tokenizer_source`` / ``tokenizer:``): embedding and head
rows re-indexed by token string to a base, union or donor vocabulary, per-token sources,
padding, and one-line errors with the recipe's line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge, plan_merge
from tests.merge._ckpt import config, finetune, save, tiny_llama
from tests.merge._recipes import load_dir, save_word_tokenizer, write_recipe

BASE_VOCAB = ["<pad>", "<s>", "a", "b", "c", "d"]
OTHER_VOCAB = ["<pad>", "<s>", "b", "a", "c", "e", "f"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _model(path: Path, vocab: list[str], seed: int) -> dict:
    sd = finetune(tiny_llama(0, vocab=len(vocab)), seed)
    cfg = {**config(), "vocab_size": len(vocab), "num_attention_heads": 2, "num_key_value_heads": 2}
    save(sd, path, cfg=cfg)
    save_word_tokenizer(path, vocab)
    return sd


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok-models")
    sds = {"ft0": _model(root / "ft0", BASE_VOCAB, 0), "ft1": _model(root / "ft1", OTHER_VOCAB, 1)}
    return {k: root / k for k in sds}, sds


RECIPE = """\
merge_method: linear
models:
  - model: {ft0}
  - model: {ft1}
dtype: float32
tokenizer_source: union
"""


def _write(tmp_path: Path, text: str, **paths) -> Path:
    return write_recipe(tmp_path, text, "recipe.yml", **paths)


_load = load_dir


def test_union_reindexes_rows_by_token(disk, tmp_path):
    from transformers import AutoTokenizer

    paths, sds = disk
    plan = plan_merge(_write(tmp_path, RECIPE, **paths))  # headers and tokenizers only
    assert plan["vocab"]["vocab_size"] == 8 and plan["vocab"]["tokens_added"] == 2
    out = merge(_write(tmp_path, RECIPE, **paths), tmp_path / "out")
    got = _load(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    vocab = tok.get_vocab()
    assert len(vocab) == 8 and got[EMBED].shape == (8, 8) and got[HEAD].shape == (8, 8)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8
    i0 = {t: i for i, t in enumerate(BASE_VOCAB)}
    i1 = {t: i for i, t in enumerate(OTHER_VOCAB)}
    for name in (EMBED, HEAD):
        a, b = sds["ft0"][name], sds["ft1"][name]
        for t, j in vocab.items():
            if t in i0 and t in i1:
                want = (a[i0[t]] + b[i1[t]]) / 2
            else:  # only one model has it: its row, for the other one too
                want = a[i0[t]] if t in i0 else b[i1[t]]
            torch.testing.assert_close(got[name][j], want, msg=f"{name} {t}")
    # layer weights are merged as usual
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q], (sds["ft0"][q] + sds["ft1"][q]) / 2)


def test_token_block_sources_force_and_padding(disk, tmp_path):
    paths, sds = disk
    text = RECIPE.replace(
        "tokenizer_source: union\n",
        "tokenizer:\n  source: base\n  pad_to_multiple_of: 4\n  tokens:\n"
        "    e: {{source: {{kind: zero}}}}\n"
        "    a: {{source: {ft1}, force: true}}\n"
        "    d:\n      source: {{kind: model_token, model: {ft1}, token: f}}\n"
        "      force: true\n",
    )
    out = merge(_write(tmp_path, text, **paths), tmp_path / "out")
    got = _load(out)[EMBED]
    a, b = sds["ft0"][EMBED], sds["ft1"][EMBED]
    assert got.shape == (8, 8)  # 6 base tokens + "e" = 7, padded to 8
    torch.testing.assert_close(got[2], b[3])  # "a": forced to ft1's row for every input
    torch.testing.assert_close(got[5], b[6])  # "d": forced to ft1's "f"
    # "e": ft1 has its own row; ft0 lacks it and gets the zero row
    torch.testing.assert_close(got[6], b[5] / 2)
    torch.testing.assert_close(got[7], got[:7].mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[4], (a[4] + b[4]) / 2)  # "c": both have it


@pytest.mark.parametrize(
    ("tokens", "line", "message"),
    [
        ("    a: {{source: ./nowhere}}\n", 8, "token source model './nowhere' is not an input"),
        (
            "    a: {{source: {{kind: model_token, model: {ft1}, token: zz}}}}\n",
            8,
            "token 'zz' is not in .*ft1's vocabulary",
        ),
        ("    a: {{source: {{kind: one}}}}\n", 8, r"tokenizer\.tokens\.a\.source: "),
    ],
)
def test_tokenizer_errors_name_the_line(disk, tmp_path, tokens, line, message):
    paths, _ = disk
    text = RECIPE.replace("tokenizer_source: union\n", "tokenizer:\n  tokens:\n" + tokens)
    with pytest.raises(SpliceError, match=message) as e:
        merge(_write(tmp_path, text, **paths), tmp_path / "out")
    assert re.search(rf"recipe\.yml:{line}\b", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()
