"""``splice analyze``: reports written on tiny random models, bad input refused in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from splice.analysis.inputs import prose
from tests.cli._run import run_cli


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "analyze", *args)


def _model_dir(root, build):
    """A random HF model dir whose word-level vocab covers the prose sample."""
    words = sorted({w for t in prose(32) for w in re.findall(r"[a-z]+", t.lower())})[:400]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    build(len(vocab)).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    def build(vocab):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, eos_token_id=3,
        ))  # fmt: skip

    return _model_dir(tmp_path_factory.mktemp("llama"), build)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    def build(vocab):
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        ))  # fmt: skip

    return _model_dir(tmp_path_factory.mktemp("bert"), build)


def test_geometry_report_on_a_decoder_and_an_encoder(
    llama_dir, bert_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "geo"
    code, stdout, err = _cli(
        monkeypatch,
        capsys,
        "geometry",
        str(llama_dir),
        "--out",
        str(out),
        "--texts",
        "8",
        "--k",
        "8",
        "--max-len",
        "24",
    )
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["layers"]) == ["0", "1", "2"] and rep["output_change"] == "kl"
    assert (out / "geometry.png").stat().st_size > 10_000
    assert "cos(u,tᵘ)" in (out / "report.md").read_text() and "Layer-update geometry" in stdout
    out2 = tmp_path / "geo-bert"
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "geometry",
        str(bert_dir),
        "--out",
        str(out2),
        "--layers",
        "1",
        "--texts",
        "6",
        "--k",
        "6",
        "--fit",
        "rank",
        "--center",
        "--quiet",
    )
    assert code == 0, err
    rep = json.loads((out2 / "report.json").read_text())
    assert list(rep["layers"]) == ["1"] and rep["output_change"] == "relative_l2_last_hidden"
    assert rep["settings"]["center"] is True


def test_safety_lapt_reports(llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "safety"
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "safety",
        str(llama_dir),
        "--out",
        str(out),
        "--layers",
        "0,2",
        "--max-prompts",
        "2",
        "--new-tokens",
        "4",
        "--quiet",
    )
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["nll"]) == {"0", "2"} and 0 <= rep["asa"]["masr"] <= 1
    assert len(rep["asa"]["records"]) == 4 and rep["settings"]["judge"] == "lexicon"
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "\n".join(f"tell me about the {w} module" for w in ["json", "path", "file", "list", "time"])
        + "\n"
    )
    out = tmp_path / "lapt"
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "lapt",
        str(llama_dir),
        "--out",
        str(out),
        "--layer",
        "1",
        "--prompts",
        str(prompts),
        "--steps",
        "2",
        "--new-tokens",
        "4",
        "--quiet",
    )
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["train_prompts"] == 3 and rep["settings"]["test_prompts"] == 2
    assert len(rep["loss_history"]) == 2 and rep["before"]["perplexity"] > 0
    assert set(rep["after"]["delta_nll"]) == {"1"}


def test_mup_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mup"
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "mup",
        "--out",
        str(out),
        "--widths",
        "16,32,64",
        "--lr-exponents",
        "-9:-5",
        "--steps",
        "3",
        "--seeds",
        "1",
        "--quiet",
    )
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) == {"settings", "mup", "sp"}
    assert set(rep["mup"]["grid"]) == {"16", "32", "64"} and len(rep["mup"]["grid"]["16"]) == 4
    assert (out / "coord_check.png").exists() and (out / "lr_sweep.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["geometry", "{llama}", "--layers", "3"], "layer 3 out of range"),
        (["geometry", "{llama}", "--layers", "a,b"], "layers 'a,b' is not a comma list"),
        (["geometry", "{llama}", "--fit", "lowrank"], "fit 'lowrank' is not one of"),
        (["geometry", "no-such-model"], "model 'no-such-model' is neither"),
        (["safety", "{llama}", "--prompts", "{empty}"], "is empty"),
        (["mup", "--widths", "64,64,128"], "need at least 3 distinct values"),
        (["mup", "--parametrizations", "mup,xp"], "parametrization 'xp' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    llama_dir, tmp_path, monkeypatch, capsys, args, message
):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "out"
    args = [a.format(llama=llama_dir, empty=empty) for a in args]
    code, _, err = _cli(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 1
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()
