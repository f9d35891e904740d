"""``splice convert recursive|prune`` and uptraining the result with ``splice train``."""

from __future__ import annotations

import json

import pytest
import torch

from splice.train import TrainConfig, train
from tests.cli._run import run_cli

from .conftest import WORDS

transformers = pytest.importorskip("transformers")


def test_recursive_full_rank_cli_reproduces_and_uptrains(llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rec"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "convert", "recursive", str(llama_dir), "--out", str(out),
        "-k", "2", "--init", "average", "--rank", "full", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["loops"] == 3 and summary["parameters"] > summary["source_parameters"]
    assert (out / "tokenizer.json").is_file() and (out / "modeling_recursive.py").is_file()
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    converted = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 15, (2, 6))
    with torch.no_grad():
        assert (converted(ids).logits - original(ids).logits).abs().max() < 1e-5

    data = tmp_path / "text.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, 10, (6,), generator=g)) for _ in range(24)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = TrainConfig(
        model=out, data=str(data), out=tmp_path / "up", method="full", objective="causal-lm",
        steps=3, batch_size=8, lr=1e-3, progress=False, seed=0,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["trainable_parameters"] == summary["parameters"]  # shared weights + LoRAs
    up = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "up" / "model")
    moved = {n for n, p in up.named_parameters() if not torch.equal(p, converted.get_parameter(n))}
    assert any("lora_A" in n for n in moved) and any(n.endswith("q_proj.weight") for n in moved)


def test_prune_cli(llama_dir, tmp_path, monkeypatch, capsys):
    code, stdout, err = run_cli(
        monkeypatch, capsys, "convert", "prune", str(llama_dir), "--out", str(tmp_path / "p"),
        "--keep", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["layers"] == [0, 2, 4]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    reference.model.layers = torch.nn.ModuleList(reference.model.layers[i] for i in (0, 2, 4))
    reference.config.num_hidden_layers = 3
    ids = torch.randint(0, 15, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids, use_cache=False).logits)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "4"], "K=4 shared layers do not divide the model's 6 layers"),
        (["-k", "2", "--rank", "17"], "rank 17 is above min(d_in, d_out) = 16"),
        (["-k", "2", "--rank", "big"], "--rank 'big'"),
        (["-k", "2", "--init", "middle"], "unknown --init 'middle'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    llama_dir, tmp_path, monkeypatch, capsys, args, message
):
    out = tmp_path / "rec"
    argv = ["convert", "recursive", str(llama_dir), "--out", str(out), *args]
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_not_a_causal_lm(tmp_path, monkeypatch, capsys):
    _bert_dir(tmp_path / "bert")
    argv = ["convert", "recursive", str(tmp_path / "bert"), "--out", str(tmp_path / "o"), "-k", "1"]
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 1 and "not a causal LM (architectures ['BertModel'])" in err


def _bert_dir(path):
    transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16,
        )
    ).save_pretrained(path)  # fmt: skip
    return path


def test_prune_and_transfer_refuse_a_non_causal_lm(llama_dir, tmp_path, monkeypatch, capsys):
    bert = _bert_dir(tmp_path / "bert")
    for argv in (
        ["prune", str(bert), "--keep", "1"],
        ["transfer", str(llama_dir), str(bert)],
        ["transfer", str(bert), str(llama_dir)],
    ):
        code, _, err = run_cli(monkeypatch, capsys, "convert", *argv, "--out", str(tmp_path / "o"))
        assert code == 1 and "not a causal LM (architectures ['BertModel'])" in err, argv
        assert str(bert) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_transfer_refuses_a_recursive_model_and_bad_options_in_one_line(
    llama_dir, tmp_path, monkeypatch, capsys
):
    rec = tmp_path / "rec"
    argv = ["convert", "recursive", str(llama_dir), "--out", str(rec), "-k", "2", "--rank", "2"]
    assert run_cli(monkeypatch, capsys, *argv)[0] == 0
    out = ["--out", str(tmp_path / "o")]
    argv = ["convert", "transfer", str(llama_dir), str(rec), *out]
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 1 and "a recursive model cannot be a transfer teacher or student" in err
    assert "splice convert prune" in err and len(err.strip().splitlines()) == 1
    for flag, value, message in [
        ("--rate", "2", "--rate 2.0: Input should be less than or equal to 1"),
        ("--heldout", "0", "--heldout 0: Input should be greater than 0"),
    ]:
        argv = ["convert", "transfer", str(llama_dir), str(llama_dir), *out, flag, value]
        code, _, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_negative_exit_loss_weight_is_refused(llama_dir, tmp_path, monkeypatch, capsys):
    argv = ["convert", "recursive", str(llama_dir), "--out", str(tmp_path / "r"), "-k", "2",
            "--exit-loss-weight", "-0.5"]  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 1 and "exit loss weight -0.5 is negative" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
