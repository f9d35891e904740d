"""``splice convert transfer`` (splice.train.transfer) on a tiny Llama teacher and its
depth-pruned student."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from splice.convert.postpkt import LowRankDelta, merge_postpkt
from splice.errors import SpliceError
from splice.train.transfer import perplexity, split_texts
from tests.cli._run import run_cli


def _run(monkeypatch, capsys, teacher, student, out, texts, *extra):
    return run_cli(
        monkeypatch, capsys, "convert", "transfer", str(teacher), str(student), "--out", str(out),
        "--data", str(texts), "--extract", "4", "--align", "8", "--heldout", "16",
        "--steps", "3", "--rank", "4", "--json", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["laten", "postpkt"])
def test_transfer_saves_the_merged_student_and_its_perplexity(
    method, llama_dir, student_dir, texts_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / method
    code, stdout, err = _run(monkeypatch, capsys, llama_dir, student_dir, out, texts_file,
                             "--method", method)  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 3 and metrics["config"]["method"] == method
    before = transformers.AutoModelForCausalLM.from_pretrained(student_dir)
    after = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(after) is type(before)  # plain Llama: ΔW merged, no LoRA or hook left
    assert set(after.state_dict()) == set(before.state_dict())
    changed = {
        n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))
    }
    assert changed and all(n.endswith(("up_proj.weight", "down_proj.weight", "o_proj.weight"))
                           for n in changed)  # fmt: skip
    # the saved model is the one measured: its held-out perplexity is the reported one
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [json.loads(line)["text"] for line in texts_file.read_text().splitlines()]
    _, _, test = split_texts(texts, 4, 8, 16, seed=1)
    assert perplexity(after, tok, test) == pytest.approx(summary["after_perplexity"], rel=1e-5)
    assert perplexity(before, tok, test) == pytest.approx(summary["before_perplexity"], rel=1e-5)
    assert summary["teacher_perplexity"] > 0


def test_different_tokenizers_exit_1(llama_dir, student_dir, texts_file, tmp_path, monkeypatch,
                                     capsys):  # fmt: skip
    other = tmp_path / "other"
    tok = transformers.AutoTokenizer.from_pretrained(student_dir)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    for f in ("config.json", "model.safetensors"):
        (other / f).write_bytes((student_dir / f).read_bytes())
    code, out, err = _run(monkeypatch, capsys, llama_dir, other, tmp_path / "o", texts_file)
    assert code == 1 and out == ""
    assert "teacher and student tokenizers differ (vocab sizes 15 vs 16" in err
    assert not (tmp_path / "o").exists()


def test_bad_method_and_non_causal_lm_are_one_line_errors(llama_dir, tmp_path, monkeypatch,
                                                          capsys):  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, "convert", "transfer", str(llama_dir),
                           str(llama_dir), "--out", str(tmp_path / "o"),
                           "--method", "distill")  # fmt: skip
    assert code != 0 and "unknown --method 'distill'" in err
    code, _, err = run_cli(monkeypatch, capsys, "convert", "transfer", str(llama_dir),
                           str(tmp_path), "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 1 and "no config.json" in err


def test_split_is_disjoint_seeded_and_checks_sizes():
    texts = [f"doc {i}" for i in range(30)]
    a, b, c = split_texts(texts, 3, 5, 10, seed=2)
    assert (len(a), len(b), len(c)) == (3, 5, 10)
    assert not (set(a) & set(b) or set(b) & set(c) or set(a) & set(c))
    assert split_texts(texts, 3, 5, 10, seed=2) == (a, b, c)
    with pytest.raises(SpliceError, match=r"30 documents; .* needs 31"):
        split_texts(texts, 10, 11, 10)


def test_merge_postpkt_keeps_the_low_rank_delta():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh())
    x = torch.randn(4, 6)
    model[0] = LowRankDelta(model[0], torch.randn(2, 6), torch.randn(5, 2))
    with torch.no_grad():
        want = model(x)
    assert merge_postpkt(model) == ["0"]
    assert type(model[0]) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
