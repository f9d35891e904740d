"""``splice search`` on a tiny random BERT: hand configurations first, the report files, a
front command line that ``splice train`` runs, resuming, a foreign study dir refused."""

from __future__ import annotations

import json
import shlex

from typer.testing import CliRunner

from splice.cli import app
from splice.errors import SpliceError


def search(bert_dir, csv_file, study, trials):
    args = ["search", str(bert_dir), str(csv_file), "--study", str(study), "--trials", str(trials)]
    return CliRunner().invoke(app, [*args, "--steps", "2", "--batch-size", "8", "--json"])


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
    assert sorted(p.name for p in study.iterdir()) == ["space.json"]
