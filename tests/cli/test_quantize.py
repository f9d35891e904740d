"""``splice quantize`` end to end on a tiny BERT: the output loads back (splice and plain
transformers), the report; and the bad inputs of issue #28 (one line, exit 1, nothing written)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.docs._fixtures import _bert_dir, _text_rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quantize")
    _bert_dir(root / "bert")
    rows = _text_rows(40)
    (root / "calib.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return root


def _splice(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from splice.cli import main

    monkeypatch.setattr(sys, "argv", ["splice", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


# every Linear and Embedding of the tiny BERT, by suffix: nothing left to quantize
_EVERY_LAYER = "word_embeddings,position_embeddings,token_type_embeddings,query,key,value,dense"
FAST = ("--iters", "10", "--bias-steps", "0", "--samples", "40", "--batch-size", "10")


def test_quantize_writes_a_model_both_loaders_read(workdir, monkeypatch, capsys):
    out = workdir / "q4"
    code, stdout, err = _splice(
        monkeypatch, capsys, "quantize", str(workdir / "bert"), "--calib",
        str(workdir / "calib.csv"), "--bits", "4", "--out", str(out), "--json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    bits = {layer["name"]: layer["bits"] for layer in report["layers"]}
    assert bits["embeddings.word_embeddings"] == 8 and set(bits.values()) == {4, 8}
    assert 0 < report["fraction"] < 0.5 and set(report["loss"]) == {"quantized"}
    assert {"model.safetensors", "quantize.json", "config.json", "vocab.txt"} <= {
        p.name for p in out.iterdir()
    }
    import transformers

    from splice.compress.files import dequantize
    from splice.train.quantize import load_quantized_model

    batch = {"input_ids": torch.tensor([[2, 9, 10, 11, 5, 3]])}
    quantized = load_quantized_model(out)(**batch).last_hidden_state
    plain = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(out))
    plain.load_state_dict(dequantize(out), strict=False)
    weights_only = plain.eval()(**batch).last_hidden_state
    assert quantized.shape == weights_only.shape == (1, 6, 16)
    assert (quantized - weights_only).abs().max() < 0.5  # the same weights; inputs not quantized


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--bits", "9"), "bits 9 is not supported — fix: use an integer from 2 to 8"),
        (("--size", "0.01"), "size 0.01 is below the smallest reachable 0."),
        (("--bits", "4", "--calib", "sk_digits"), "is image, but the model takes text"),
        (("--bits", "4", "--pipeline", "heavy"), "--pipeline: Input should be 'light' or"),
        (("--bits", "1"), "bits 1 is not supported — fix: use an integer from 2 to 8"),
        (("--bits", "4", "--a-bits", "9"), "activation bits 9 is not supported"),
        (("--bits", "4", "--exclude", _EVERY_LAYER), "the model has no quantizable layer"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(workdir, monkeypatch, capsys, args, message):
    out = workdir / "bad"
    calib = () if "--calib" in args else ("--calib", str(workdir / "calib.csv"))
    code, _, err = _splice(
        monkeypatch, capsys, "quantize", str(workdir / "bert"), *calib, "--out", str(out),
        *args, *FAST,
    )  # fmt: skip
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
