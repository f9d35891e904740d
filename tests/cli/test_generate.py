"""``splice generate`` end to end on a tiny saved model: streaming/JSON output, greedy
speculative equals plain, and one-line errors (exit 1) for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splice.cli import app
from tests.decode.conftest import WORDS, tiny_llama, word_tokenizer


def _save(path: Path, words: list[str], seed: int) -> Path:
    model = tiny_llama(vocab=len(words), layers=3, seed=seed, sharpen=3.0)
    model.save_pretrained(path)
    word_tokenizer(words).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    return {
        "target": _save(root / "target", WORDS, 0),
        "other_vocab": _save(root / "other", [*WORDS[:-1], "zebra"], 1),
    }


def _run(*args: str):
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def _json(*args: str) -> dict:
    r = _run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_self_draft_greedy_equals_plain_and_reports_metrics(dirs: dict[str, Path]) -> None:
    common = (
        dirs["target"],
        "--prompt",
        "the rich man",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    )
    plain = _json(*common)
    spec = _json(*common, "--self-draft", "2", "--gamma", "3")
    assert spec["text"] == plain["text"] and spec["lossless"] and plain["lossless"]
    assert spec["metrics"]["gamma"] == 3 and spec["metrics"]["alpha"] is not None
    assert plain["metrics"]["tokens_per_target_call"] == 1.0
    for extra in (("--int8",), ("--int8", "--self-draft", "2")):  # int8 copy of the target
        q = _json(*common, *extra, "--gamma", "3")
        assert q["text"] == plain["text"] and q["lossless"] and q["drafter"].startswith("int8")
    lean = _json(*common, "--lean")  # plain decoding on the lean forward: the same text
    assert lean["text"] == plain["text"] and lean["drafter"] == "none"
    for extra in (("--int8",), ("--self-draft", "2"), ("--ngram", "2")):
        q = _json(*common, "--lean", *extra, "--gamma", "3")
        assert q["text"] == plain["text"] and q["lossless"] and q["metrics"]["alpha"] is not None
        assert "lean" in q["drafter"] or "n-gram" in q["drafter"]
    amb = _json(*common, "--policy", "ambedkar", "--k", "3")
    assert not amb["lossless"] and amb["metrics"]["scorer_calls"] > 0
    lean_amb = _json(*common, "--policy", "ambedkar", "--k", "3", "--lean")  # one joint forward
    assert lean_amb["text"] == amb["text"] and "one forward" in lean_amb["drafter"]


def test_streams_text_to_the_terminal(dirs: dict[str, Path]) -> None:
    r = _run(dirs["target"], "--prompt", "the man", "--max-new-tokens", "5", "--ngram", "2")
    assert r.exit_code == 0, r.output
    assert "target's distribution" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (("--prompt", "  "), "the prompt is empty"),
        (("--prompt", "the", "--gamma", "0"), "--gamma 0 must be >= 1"),
        (("--prompt", "the", "--top-p", "1.5"), r"top_p=1.5 is outside \(0, 1\]"),
        (("--prompt", "the", "--top-p", "0"), r"top_p=0.0 is outside \(0, 1\]"),
        (("--prompt", "the", "--policy", "fast"), "unknown --policy 'fast'"),
        (("--prompt", "the", "--int8", "--ngram", "2"), "--int8 quantises the target's own"),
        (("--prompt", "the", "--lean", "--policy", "tq"), "--lean serves --policy speculative or"),
        (
            ("--prompt", "the", "--lean", "--policy", "ambedkar", "--self-draft", "2"),
            "drafts and verifies with MODEL itself",
        ),
        (("--prompt", "the", "--policy", "ambedkar", "--cf-mode", "swap"), "unknown --cf-mode"),
    ],
)
def test_bad_input_is_one_line_exit_1(dirs: dict[str, Path], args: tuple, message: str) -> None:
    r = _run(dirs["target"], *args)
    assert r.exit_code == 1
    assert len(str(r.exception).splitlines()) == 1
    assert __import__("re").search(message, str(r.exception)), r.exception


def test_drafter_with_another_tokenizer_is_refused_naming_both(dirs: dict[str, Path]) -> None:
    r = _run(dirs["target"], "--prompt", "the", "--draft", dirs["other_vocab"])
    assert r.exit_code == 1
    msg = str(r.exception)
    assert str(dirs["target"]) in msg and str(dirs["other_vocab"]) in msg and "differs" in msg


def test_unbalanced_term_list_is_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("violent, peaceful\nrich\n")
    r = _run(dirs["target"], "--prompt", "the", "--policy", "ambedkar", "--terms", terms)
    assert r.exit_code == 1
    assert "line 2 'rich' has 1 term(s), a pair needs 2" in str(r.exception)
    terms.write_text("Hindu, Muslim\n")  # identity terms: swapped only under identity_swap
    r = _run(dirs["target"], "--prompt", "the Hindu man", "--policy", "ambedkar", "--terms", terms)
    assert r.exit_code == 1 and "protected term 'hindu' is in the swap list" in str(r.exception)
    ok = _json(dirs["target"], "--prompt", "the Hindu man", "--policy", "ambedkar", "--terms",
               terms, "--cf-mode", "identity_swap", "--max-new-tokens", "3")  # fmt: skip
    assert ok["metrics"]["scorer_calls"] == 6


@pytest.fixture(scope="module")
def adapter_dirs(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two LoRA adapters of the target (moved off init), the target with "b" merged in, and an
    adapter of a wider base."""
    import torch
    from transformers import AutoModelForCausalLM

    from splice.adapters import inject, remove_adapters, save_adapter

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, name in ((1, "a"), (2, "b")):
        model = AutoModelForCausalLM.from_pretrained(dirs["target"])
        inject(model, "lora", ["q_proj", "v_proj"], r=2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))
        out[name] = save_adapter(model, root / name)
    remove_adapters(model, merge=True)
    model.save_pretrained(root / "merged_b")
    word_tokenizer(WORDS).save_pretrained(root / "merged_b")
    out["merged_b"] = root / "merged_b"
    from transformers import LlamaForCausalLM

    cfg = tiny_llama(vocab=len(WORDS)).config
    cfg.hidden_size, cfg.head_dim = 48, 12
    wide = LlamaForCausalLM(cfg)
    inject(wide, "lora", ["q_proj", "v_proj"], r=2)
    out["wide"] = save_adapter(wide, root / "wide")
    return out


def test_named_adapters_and_the_active_one(dirs: dict[str, Path], adapter_dirs: dict) -> None:
    common = ("--prompt", "the rich man", "--temperature", "0", "--max-new-tokens", "10")
    merged = _json(adapter_dirs["merged_b"], *common)
    a, b = (f"{n}={adapter_dirs[n]}" for n in ("a", "b"))
    via_adapter = _json(dirs["target"], *common, "--adapter", a, "--adapter", b, "--active", "b")
    weighted = _json(dirs["target"], *common, "--adapter", a, "--adapter", b, "--active", "b:1,a:0")
    assert via_adapter["text"] == merged["text"] == weighted["text"]
    assert _json(dirs["target"], *common, "--adapter", a, "--adapter", b)["text"] != merged["text"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--active", "c"), "no adapter named 'c' is loaded"),
        (("--active", "a:x"), "weight 'x' of 'a' is not a number"),
        (("--adapter", "WIDE"), "trained on a base whose"),
    ],
)
def test_adapter_bad_input_is_one_line_exit_1(dirs, adapter_dirs, extra, message) -> None:
    extra = tuple(f"w={adapter_dirs['wide']}" if e == "WIDE" else e for e in extra)
    r = _run(dirs["target"], "--prompt", "the", "--adapter", f"a={adapter_dirs['a']}", *extra)
    assert r.exit_code == 1
    assert message in str(r.exception) and len(str(r.exception).splitlines()) == 1
