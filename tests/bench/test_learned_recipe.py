"""Learned-merge recipes end to end on a tiny BERT and two local CSV tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from splice.bench.learned_recipe import is_learned_recipe, load_learned_recipe, run_recipe
from splice.errors import SpliceError

WORDS = {
    "mood": {"pos": ["good", "great", "happy"], "neg": ["bad", "awful", "sad"]},
    "topic": {"animal": ["cat", "dog", "bird"], "meal": ["bread", "rice", "soup"]},
}
FILLER = ["the", "a", "it", "was", "this", "day"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer BERT with a word vocab, and two CSV tasks."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    words = sorted({*FILLER, *(w for t in WORDS.values() for ws in t.values() for w in ws)})
    (root / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    model = root / "model"
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(str(model))
    cfg = BertConfig(
        vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(model))
    rng = np.random.default_rng(0)
    tasks = []
    for name, classes in WORDS.items():
        rows = ["text,label"]
        for i in range(80):
            label = sorted(classes)[i % 2]
            rows.append(
                " ".join([*rng.choice(FILLER, 3), *rng.choice(classes[label], 2)]) + f",{label}"
            )
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
        tasks.append(str(root / f"{name}.csv"))
    return str(model), tasks


def _recipe(tiny, method, **params):
    model, tasks = tiny
    return {
        "method": method,
        "models": tasks,
        "params": params,
        "data": {"split": "val", "samples": 8, "text_model": model, "max_len": 12},
        "finetune": {"steps": 15, "batch_size": 8},
    }


def test_adamerging_recipe_writes_a_loadable_model_heads_and_record(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "merged"
    summary = run_recipe(_recipe(tiny, "adamerging", steps=3, batch_size=4), out)
    assert summary["tasks"] == ["mood", "topic"] and set(summary["accuracy"]) == {
        "mood",
        "topic",
    }
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    record = json.loads((out / "splice-learned.json").read_text())
    assert len(record["history"]) == 3 and record["recipe"]["method"] == "adamerging"
    coef = torch.tensor(record["coefficients"])
    assert coef.shape == (len(record["info"]["names"]), 2)
    heads = load_file(str(out / "heads.safetensors"))
    assert heads["mood/weight"].shape == (2, 16)
    from transformers import AutoModel

    merged = AutoModel.from_pretrained(str(out))
    base = AutoModel.from_pretrained(tiny[0])
    name = record["info"]["names"][0]
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    untouched = "embeddings.word_embeddings.weight"
    assert torch.equal(merged.state_dict()[untouched], base.state_dict()[untouched])


@pytest.mark.parametrize(("method", "params"), [("lot", {}), ("opcm", {}), ("atlas", {"steps": 2})])
def test_other_methods_run_from_a_recipe(tiny, tmp_path, monkeypatch, method, params):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    summary = run_recipe(_recipe(tiny, method, **params))
    assert all(0 <= a <= 1 for a in summary["accuracy"].values())


def test_recipe_errors_are_one_line_and_early(tiny, tmp_path):
    assert is_learned_recipe(_recipe(tiny, "adamerging"))
    assert not is_learned_recipe({"method": "ties", "models": ["a"]})
    with pytest.raises(SpliceError, match="valid keys"):
        load_learned_recipe(_recipe(tiny, "adamerging", stpes=3))
    bad = _recipe(tiny, "adamerging")
    bad["data"] = {**bad["data"], "split": "test"}
    with pytest.raises(SpliceError, match=r"data\.split"):
        load_learned_recipe(bad)
    with pytest.raises(SpliceError, match="did you mean 'adamerging'"):
        load_learned_recipe(_recipe(tiny, "adamergin"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(SpliceError, match="output exists"):
        run_recipe(_recipe(tiny, "lot"), tmp_path / "exists")


def test_splice_merge_cli_runs_a_recipe_with_a_data_section(tiny, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from splice.cli import app

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(_recipe(tiny, "concrete", steps=2)))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["method"] == "concrete" and (tmp_path / "out" / "heads.safetensors").is_file()


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """A base BertModel and two sequence-classification fine-tunes (2 and 3 labels) of it."""
    from transformers import BertForSequenceClassification, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    base = BertModel.from_pretrained(tiny[0])
    base.save_pretrained(str(root / "base"))
    tok = BertTokenizerFast.from_pretrained(tiny[0])
    tok.save_pretrained(str(root / "base"))
    g = torch.Generator().manual_seed(0)
    for name, labels in (("ft_mood", ["neg", "pos"]), ("ft_three", ["x", "y", "z"])):
        cfg = base.config.to_dict() | {
            "id2label": dict(enumerate(labels)),
            "label2id": {lab: i for i, lab in enumerate(labels)},
        }
        ft = BertForSequenceClassification(base.config.__class__(**cfg))
        ft.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for n, p in ft.bert.named_parameters():
                if "encoder" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        rows = ["text,label"] + [f"the good day {i},{labels[i % len(labels)]}" for i in range(12)]
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_checkpoint_recipe_merges_backbones_and_keeps_each_classifier(checkpoints, tmp_path):
    from transformers import AutoModel

    root = checkpoints
    recipe = {
        "method": "adamerging",
        "base": str(root / "base"),
        "models": [
            {"path": str(root / n), "data": str(root / f"{n}.csv")} for n in ("ft_mood", "ft_three")
        ],
        "params": {"steps": 2, "batch_size": 4},
        "data": {"samples": 8, "max_len": 8},
    }
    out = tmp_path / "merged"
    summary = run_recipe(recipe, out)
    assert summary["tasks"] == ["ft_mood", "ft_three"] and set(summary["accuracy"]) == {
        "ft_mood", "ft_three"
    }  # fmt: skip
    heads = load_file(str(out / "heads.safetensors"))
    assert heads["ft_mood/classifier.weight"].shape == (2, 16)
    assert heads["ft_three/classifier.weight"].shape == (3, 16)
    merged = AutoModel.from_pretrained(str(out)).state_dict()
    base = AutoModel.from_pretrained(str(root / "base")).state_dict()
    record = json.loads((out / "splice-learned.json").read_text())
    names = record["info"]["names"]
    assert all("encoder" in n for n in names)  # only changed tensors are merged
    coef = torch.tensor(record["coefficients"])
    from splice.io import open_checkpoint

    fts = [open_checkpoint(root / n) for n in ("ft_mood", "ft_three")]
    for b, n in enumerate(names):
        short = n.removeprefix("bert.")
        ref = base[short] + sum(coef[b, i] * (fts[i][n] - base[short]) for i in range(2))
        torch.testing.assert_close(merged[short], ref)
    assert torch.equal(
        merged["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"]
    )


def test_regmean_and_fisher_recipes_reuse_statistics_and_refuse_foreign_ones(
    tiny, tmp_path, monkeypatch
):
    import shutil

    import yaml
    from transformers import BertModel
    from typer.testing import CliRunner

    from splice.cli import app

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    stats = str(tmp_path / "stats")
    first = run_recipe(_recipe(tiny, "regmean", stats=stats))
    again = run_recipe(_recipe(tiny, "regmean", stats=stats))
    assert again["info"]["stats_loaded"] == first["tasks"] and not first["info"]["stats_loaded"]
    assert again["accuracy"] == first["accuracy"]
    fisher = run_recipe(_recipe(tiny, "fisher", num_samples=4))
    assert all(0 <= a <= 1 for a in fisher["accuracy"].values())
    other = tmp_path / "other-base"  # the same architecture and tokenizer, other weights
    shutil.copytree(tiny[0], other)
    torch.manual_seed(1)
    BertModel(BertModel.from_pretrained(tiny[0]).config).save_pretrained(str(other))
    recipe = _recipe((str(other), tiny[1]), "regmean", stats=stats)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert res.exit_code == 1
    msg = str(res.exception)
    assert "another base model" in msg and len(msg.splitlines()) == 1
    assert not (tmp_path / "out").exists()
