"""``splice search`` on a tiny random BERT, in both spaces: hand configurations first, the
report files, a front command line that ``splice train`` runs, resuming, a foreign study dir
refused."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from splice.cli import app
from splice.errors import SpliceError


def search(bert_dir, csv_file, study, trials, space="lora"):
    args = ["search", str(bert_dir), str(csv_file), "--study", str(study), "--trials", str(trials)]
    args += ["--space", space, "--steps", "2", "--batch-size", "8", "--json"]
    return CliRunner().invoke(app, args)


def test_search_writes_the_front_and_its_commands(bert_dir, csv_file, tmp_path):
    study = tmp_path / "study"
    result = search(bert_dir, csv_file, study, 3)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = report["trials"]
    assert len(rows) == 3
    hand = [r for r in rows if r["hand"]]
    assert [sorted(r["targets"]) for r in hand] == [
        ["query", "value"],
        ["dense", "key", "query", "value"],
    ]
    assert all(r["rank"] == 8 and r["layers"] == [0, 1] for r in hand)
    for r in rows:  # no front point is dominated by any trial
        if r["front"]:
            assert not any(
                o["accuracy"] >= r["accuracy"] and o["share_percent"] <= r["share_percent"]
                and (o["accuracy"], o["share_percent"]) != (r["accuracy"], r["share_percent"])
                for o in rows
            )  # fmt: skip
    for name in ("front.md", "front.json", "front.png", "front.sh", "study.db", "space.json"):
        assert (study / name).is_file()
    assert (study / "front.md").read_text().count("\n") == 2 + 3
    # a front line is a splice train command that runs
    line = (study / "front.sh").read_text().splitlines()[0]
    words = shlex.split(line.replace("OUT", str(tmp_path / "again")))
    assert words[:2] == ["splice", "train"]
    rerun = CliRunner().invoke(app, [*words[1:], "--json"])
    assert rerun.exit_code == 0, rerun.output
    front_row = next(r for r in rows if r["command"] == line)
    assert json.loads(rerun.stdout)["eval"]["accuracy"] == front_row["accuracy"]  # same run
    # resuming: one more trial, the first three kept
    more = json.loads(search(bert_dir, csv_file, study, 4).stdout)["trials"]
    assert len(more) == 4 and [r["command"] for r in more[:3]] == [r["command"] for r in rows]


def test_a_study_dir_of_another_model_is_refused(bert_dir, csv_file, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "space.json").write_text(json.dumps({"name": "sappa", "dims": [], "meta": {}}))
    result = search(bert_dir, csv_file, study, 2)
    assert isinstance(result.exception, SpliceError)
    assert "made for another search space ('sappa', 0 dims" in str(result.exception)
    assert "this search: 'lora'" in str(result.exception)
    assert sorted(p.name for p in study.iterdir()) == ["space.json"]


def test_sappa_search_trains_the_paper_space_and_resumes(bert_dir, csv_file, tmp_path):
    study = tmp_path / "study"
    result = search(bert_dir, csv_file, study, 3, space="sappa")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = report["trials"]
    assert report["space"] == "sappa" and [r["trial"] for r in rows] == [0, 1, 2]
    hand, searched = rows[:2], rows[2:]
    assert all(r["hand"] and r["method"] == "lora" and r["rank"] == 8 for r in hand)
    assert [sorted(r["targets"]) for r in hand] == [
        ["query", "value"],
        ["dense", "key", "query", "value"],
    ]
    assert all("dominated_by" in r for r in hand) and not any(r["front"] for r in hand)
    row = searched[0]
    assert row["front"] and not row["hand"]  # one SAPPA trial: its own front
    # seed 0 samples a configuration with no module first: the head alone trains (share 0)
    assert row["method"] == "head" and row["share_percent"] == 0.0
    assert (row["serial"], row["parallel"], row["prefix"], row["layers"]) == (0, 0, 0, [])
    assert (study / "front.sh").read_text().splitlines()[0] == row["command"]
    assert (study / "hand.json").is_file() and (study / "front.png").is_file()
    # resuming: the hand trials are not trained again, one more SAPPA trial runs
    for p in (study / "trials").iterdir():
        if p.name.startswith("hand-"):
            p.rename(tmp_path / p.name)  # gone: resuming must not train or read them
    more = json.loads(search(bert_dir, csv_file, study, 4, space="sappa").stdout)["trials"]
    assert len(more) == 4 and [r["command"] for r in more[:3]] == [r["command"] for r in rows]
    assert not any(p.name.startswith("hand-") for p in (study / "trials").iterdir())
    new = more[3]
    assert new["method"] == "sappa" and "--method sappa" in new["command"]
    sizes = [new[k] for k in ("serial", "parallel", "prefix")]
    d, total = 16, _backbone_parameters(bert_dir)
    biases = sum(s + d for s in sizes[:2] if s)
    count = len(new["layers"]) * (2 * d * sum(sizes) + biases)  # sappa_count's formula
    assert new["share_percent"] == pytest.approx(100 * count / total)
    words = shlex.split(new["command"].replace("OUT", str(tmp_path / "again")))
    rerun = json.loads(CliRunner().invoke(app, [*words[1:], "--json"]).stdout)
    assert rerun["eval"]["accuracy"] == new["accuracy"]  # the same run
    # the LoRA space on this dir is refused, naming both spaces
    other = search(bert_dir, csv_file, study, 5)
    assert isinstance(other.exception, SpliceError)
    assert "another search space ('sappa'" in str(other.exception)
    assert "this search: 'lora'" in str(other.exception)


def test_a_sappa_budget_of_only_the_hand_configurations_is_refused(bert_dir, csv_file, tmp_path):
    result = search(bert_dir, csv_file, tmp_path / "s", 2, space="sappa")
    assert isinstance(result.exception, SpliceError)
    assert "--trials 2 leaves no SAPPA trial after the 2 hand configurations" in str(
        result.exception
    )
    assert not (tmp_path / "s").exists()


def _backbone_parameters(model_dir):
    import transformers

    return sum(p.numel() for p in transformers.AutoModel.from_pretrained(model_dir).parameters())
