"""Vocab policies base|union|intersect when embedding / head rows differ (rows matched by index)."""

from __future__ import annotations

import json

import pytest
import torch

from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.merge import merge
from tests.merge._ckpt import config, finetune, save, tiny_llama
from tests.merge.output.test_ledger import assert_full_coverage

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = tiny_llama(0, vocab=16)
    wide = finetune(base, 1)
    g = torch.Generator().manual_seed(9)
    for n in VOCAB:  # two tokens appended at the end (added special tokens)
        wide[n] = torch.cat([wide[n], torch.randn(2, 8, generator=g)])
    models = {"base": (base, 16), "ft16": (finetune(base, 2), 16), "ft18": (wide, 18)}
    for name, (sd, rows) in models.items():
        save(sd, root / name, cfg={**config(), "vocab_size": rows})
        (root / name / "tokenizer.json").write_text(json.dumps({"tokens": rows}))
    return root, {k: v for k, (v, _) in models.items()}


def _ta(root, tmp_path, vocab=None, method="task_arithmetic"):
    recipe = {"method": method, "models": [str(root / "ft16"), str(root / "ft18")]}
    if method == "task_arithmetic":
        recipe["base"] = str(root / "base")
    if vocab:
        recipe["vocab"] = vocab
    return merge(recipe, tmp_path / f"out-{vocab}-{method}")


def test_differing_rows_need_a_policy(disk, tmp_path):
    root, _ = disk
    with pytest.raises(SpliceError) as e:
        _ta(root, tmp_path)
    msg = str(e.value)
    assert str(root / "ft18") in msg and "18 rows here but 16" in msg and "vocab: union" in msg


@pytest.mark.parametrize("policy", ["base", "intersect", "union"])
def test_policies(disk, tmp_path, policy):
    root, sds = disk
    out = _ta(root, tmp_path, policy)
    got = open_checkpoint(out)
    rows = 18 if policy == "union" else 16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == rows
    assert json.loads((out / "tokenizer.json").read_text()) == {"tokens": rows}
    b, a, w = sds["base"], sds["ft16"], sds["ft18"]
    for n in VOCAB:
        assert got[n].shape == (rows, 8)
        ref = b[n] + (a[n] - b[n]) + (w[n][:16] - b[n])  # shared rows: plain task arithmetic
        torch.testing.assert_close(got[n][:16], ref, atol=1e-6, rtol=0)
        if policy == "union":  # rows only ft18 has: the base takes ft18's row, τ = 0 for all
            torch.testing.assert_close(got[n][16:], w[n][16:], atol=1e-6, rtol=0)
    ledger = assert_full_coverage(out, {str(root / m): root / m for m in ("base", "ft16", "ft18")})
    report = ledger["vocab"]
    assert report["policy"] == policy and report["vocab_size"] == rows
    assert report["matching"] == "by row index (no tokenizer alignment)"
    assert report["tokenizer_from"] == str(root / ("ft18" if policy == "union" else "base"))
    if policy == "union":
        assert (report["rows_added"], report["rows_dropped"], report["rows_padded"]) == (4, 0, 8)
        entry = report["tensors"]["lm_head.weight"]["inputs"]
        assert entry[str(root / "ft16")] == {"rows": 16, "padded": [16, 18]}
    else:
        assert (report["rows_added"], report["rows_dropped"], report["rows_padded"]) == (0, 4, 0)
        entry = report["tensors"]["lm_head.weight"]["inputs"]
        assert entry[str(root / "ft18")] == {"rows": 18, "dropped": [16, 18]}


def test_union_without_a_base_keeps_the_only_models_rows(disk, tmp_path):
    root, sds = disk
    out = _ta(root, tmp_path, "union", method="linear")
    got = open_checkpoint(out)
    a, w = sds["ft16"], sds["ft18"]
    for n in VOCAB:
        torch.testing.assert_close(got[n][:16], (a[n] + w[n][:16]) / 2, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[n][16:], w[n][16:], atol=1e-6, rtol=0)
