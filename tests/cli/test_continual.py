"""`splice continual` on the command line: the record, and one-line errors that lose nothing."""

from __future__ import annotations

import json

import pytest

from tests.cli._run import run_cli
from tests.continual._bert import make_bert_and_tasks


def _run(args, monkeypatch, capsys) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "continual", *args)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert_and_tasks(tmp_path_factory.mktemp("bert"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_continual_cli_writes_the_matrix_and_refuses_bad_resumes(
    bert, tmp_path, monkeypatch, capsys
):
    model, paths = bert
    out = tmp_path / "out"
    common = ["--model", str(model), "--steps", "2", "--batch-size", "8", "--out", str(out)]
    args = [str(paths["mood"]), str(paths["topic"]), *common, "--set", "k=4"]
    code, stdout, stderr = _run(args, monkeypatch, capsys)
    assert code == 0, stderr
    assert "task 2/2 topic" in stderr and "average accuracy" in stdout
    rec = json.loads((out / "continual.json").read_text())
    assert rec["tasks"] == ["mood", "topic"] and rec["R"][0][1] is None
    assert rec["config"]["options"] == {"k": 4}
    state = (out / "state" / "method.safetensors").read_bytes()

    code, _, stderr = _run(
        [*args[:2], *common, "--method", "igsp", "--resume"], monkeypatch, capsys
    )
    (line,) = _errors(stderr)
    assert code == 1 and "cannot resume with method 'igsp'" in line and "Traceback" not in stderr
    assert (out / "state" / "method.safetensors").read_bytes() == state


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["mood", "topic", "mood"], 1, "repeats task 'mood'"),
        (["mood", "--method", "shar"], 1, "did you mean 'share'"),
        (["mood", "--set", "kk=3"], 1, "kk"),
        (["mood", "--set", "k"], 2, "is not key=value"),
    ],
)
def test_continual_cli_errors_are_one_line(
    bert, tmp_path, monkeypatch, capsys, extra, code, message
):
    model, paths = bert
    tasks = [str(paths[a]) if a in paths else a for a in extra]
    args = [*tasks, "--model", str(model), "--steps", "1", "--out", str(tmp_path / "o")]
    got, _, stderr = _run(args, monkeypatch, capsys)
    errors = _errors(stderr)
    assert got == code and len(errors) == 1 and message in errors[0], stderr
    assert not (tmp_path / "o").exists()  # nothing written
