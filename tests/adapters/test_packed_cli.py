"""Packed adapter files at the CLI: ``splice inspect`` loads a splice adapter dir onto its
recorded base, so a mask or code file that does not fit the weights is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from splice.adapters import inject, save_adapter
from tests.cli._run import run_cli

QUERY = "encoder.layer.0.attention.self.query"


def _shorter_mask(adapter_dir) -> None:
    """Drop the last byte of the first layer's packed mask (8 bits too few)."""
    f = adapter_dir / "splice_adapter.safetensors"
    tensors = load_file(str(f))
    tensors[f"{QUERY}.adapter.mask"] = tensors[f"{QUERY}.adapter.mask"][:-1].clone()
    save_file(tensors, str(f), metadata={"format": "splice.adapter/1"})


def _two_bit_config(adapter_dir) -> None:
    """Record bits=2 for a file written at 1 bit: the codebook size does not fit the codes."""
    f = adapter_dir / "splice_adapter.json"
    info = json.loads(f.read_text())
    info["config"]["bits"] = 2
    f.write_text(json.dumps(info))


@pytest.mark.parametrize(("method", "options", "corrupt", "message"), [
    ("bilora", {"r": 2}, _two_bit_config, "the file holds 24 bytes; a 4-level codebook"),
    ("biadaptformer", {"r": 2, "sublayer": "site"}, _two_bit_config,
     "the file holds 24 bytes; a 4-level codebook"),
    ("ramt", {}, _shorter_mask, "mask file holds 248 bits (saved for a (16, 16) weight)"),
])  # fmt: skip
def test_mismatched_packed_file_exits_1_naming_file_and_module(
    method, options, corrupt, message, tmp_path, monkeypatch, capsys
):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "base")
    model = transformers.BertModel.from_pretrained(tmp_path / "base")
    inject(model, method, ["query"], **options)
    save_adapter(model, tmp_path / "a", base_model=tmp_path / "base")
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "a"), "--json")
    assert code == 0 and json.loads(out)["method"] == method
    corrupt(tmp_path / "a")
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "a"))
    (line,) = [x for x in err.splitlines() if "error" in x]  # (transformers' load bar aside)
    assert code == 1 and out == ""
    assert line.startswith(f"error: {tmp_path / 'a'}: {QUERY}: {message}")
