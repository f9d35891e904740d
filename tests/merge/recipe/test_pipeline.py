"""Multi-document recipes (mergekit-multi): a DAG of named intermediates, each run once,
``--lazy`` reuse, preflight of every stage before the first runs, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import splice.merge.api as api
from splice.errors import SpliceError, UsageError
from splice.merge import merge, merge_state_dicts, plan_merge
from splice.merge.pipeline import merge_pipeline
from tests.cli._run import run_cli
from tests.merge._recipes import base_and_finetunes, load_dir, write_recipe

PIPE = """\
name: soup
merge_method: linear
models:
  - model: {ft0}
  - model: {ft1}
---
merge_method: task_arithmetic
base_model: {base}
models:
  - model: soup
    parameters: {{weight: 0.5}}
  - model: mid
    parameters: {{weight: 0.5}}
---
name: mid
merge_method: slerp
base_model: {base}
models:
  - model: soup
parameters: {{t: 0.5}}
"""


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return base_and_finetunes(tmp_path_factory.mktemp("pipe-models"))


def _write(tmp_path: Path, text: str, **paths) -> Path:
    return write_recipe(tmp_path, text, "multi.yml", **paths)


_load = load_dir


@pytest.fixture
def counted(monkeypatch):
    calls: list[str] = []
    real = api.merge

    def spy(recipe, out, **options):
        calls.append(Path(out).name)
        return real(recipe, out, **options)

    monkeypatch.setattr(api, "merge", spy)
    return calls


def test_dag_runs_each_intermediate_once_in_order_then_lazy_reuses(disk, tmp_path, counted):
    paths, base, fts = disk
    recipe = _write(tmp_path, PIPE, **paths)
    inter, out = tmp_path / "inter", tmp_path / "out"
    done = merge_pipeline(recipe, out, intermediates=inter)
    assert counted == ["soup", "mid", "out"]  # soup is read twice, built once
    assert done["ran"] == ["soup", "mid", str(out)] and done["reused"] == []
    soup = merge_state_dicts("linear", fts)
    mid = merge_state_dicts("slerp", [soup], base=base, params={"t": 0.5})
    want = merge_state_dicts(
        "task_arithmetic", [soup, mid], base=base, model_params=[{"weight": 0.5}] * 2
    )
    got = _load(out)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    counted.clear()
    again = merge_pipeline(recipe, out, intermediates=inter, lazy=True)
    assert counted == [] and again["reused"] == ["soup", "mid", str(out)]
    # a changed document is not reused, and neither is what reads it
    recipe.write_text(recipe.read_text().replace("t: 0.5", "t: 0.25"))
    third = merge_pipeline(recipe, out, intermediates=inter, lazy=True, force=True)
    assert counted == ["mid", "out"] and third["reused"] == ["soup"]


def test_plan_covers_stages_whose_inputs_are_not_built_yet(disk, tmp_path):
    paths, _, _ = disk
    recipe = _write(tmp_path, PIPE, **paths)
    report = plan_merge(recipe, intermediates=str(tmp_path / "inter"))
    assert [s["name"] for s in report["stages"]] == ["soup", "mid", None]
    assert all(s["plan"]["tensors"]["merged"] > 0 for s in report["stages"])
    assert report["peak_ram"] > 0
    assert not (tmp_path / "inter").exists()
    # a typo in the last stage's parameters fails before anything runs
    bad = _write(tmp_path, PIPE.replace("t: 0.5", "tt: 0.5"), **paths)
    with pytest.raises(SpliceError, match="unknown parameter of slerp 'tt'"):
        merge(bad, tmp_path / "out", intermediates=str(tmp_path / "inter"))
    assert not (tmp_path / "inter" / "soup").exists()


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("  - model: soup\nparameters", "  - model: out2\nparameters", 19, "out2.*neither"),
        (
            "name: soup\nmerge_method: linear\nmodels:\n  - model: {ft0}",
            "name: soup\nmerge_method: linear\nmodels:\n  - model: mid",
            1,
            "cycle: soup -> mid",
        ),
        ("name: mid", "name: soup", 15, "two documents are named 'soup'"),
        ("---\nname: mid", "---\nname: mid/x", 15, "not a plain file name"),
    ],
)
def test_pipeline_errors_name_the_line(disk, tmp_path, old, new, line, message):
    paths, _, _ = disk
    assert old in PIPE
    recipe = _write(tmp_path, PIPE.replace(old, new), **paths)
    with pytest.raises(SpliceError, match=message) as e:
        merge(recipe, tmp_path / "out", intermediates=str(tmp_path / "inter"))
    assert re.search(rf"multi\.yml:{line}\b", str(e.value)), str(e.value)
    assert not (tmp_path / "inter").exists() and not (tmp_path / "out").exists()


def test_intermediates_dir_is_required(disk, tmp_path):
    paths, _, _ = disk
    with pytest.raises(UsageError, match="--intermediates"):
        merge(_write(tmp_path, PIPE, **paths), tmp_path / "out")


def test_cli_runs_a_pipeline_lazily(disk, tmp_path, monkeypatch, capsys):
    paths, _, _ = disk
    recipe = _write(tmp_path, PIPE, **paths)
    args = ["merge", str(recipe), str(tmp_path / "out"), "--intermediates", str(tmp_path / "i")]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "ran soup, mid" in out
    code, out, _ = run_cli(monkeypatch, capsys, *args, "--lazy")
    assert code == 0 and "ran nothing; reused soup, mid" in out
