"""`splice bench` on the command line: files written, table printed, usage errors."""

from __future__ import annotations

import json

import pytest

from tests.cli._run import run_cli


def _run(args, monkeypatch, capsys) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "bench", *args)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))


def test_bench_cli_writes_report_for_local_tasks(tmp_path, monkeypatch, capsys):
    for name, words in (("spam", ("buy now", "hello friend")), ("tone", ("great", "awful"))):
        rows = ["text,label"] + [f"{words[i % 2]} item {i},{i % 2}" for i in range(60)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    tasks = f"{tmp_path / 'spam.csv'},{tmp_path / 'tone.csv'}"
    args = ["--tasks", tasks, "--steps", "2", "--methods", "task_arithmetic", "--out", str(out)]
    code, stdout, stderr = _run(args, monkeypatch, capsys)
    assert code == 0, stderr
    assert "task_arithmetic" in stdout and "individual" in stdout and "wrote" in stderr
    names = ["journal.jsonl", "results.json", "results.md", "results.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    data = json.loads((out / "results.json").read_text())
    assert list(data["tasks"]) == ["spam", "tone"]
    assert data["config"]["train"]["steps"] == 2

    # Ctrl-C in the merge: the journal keeps the reference rows and says how to go on
    import splice.bench.rows as rows

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rows, "merge_state", interrupt)
    code, _, stderr = _run(args, monkeypatch, capsys)
    assert code == 130 and "1 finished rows are kept in" in stderr and "--resume" in stderr
    monkeypatch.undo()
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    code, _, stderr = _run([*args, "--resume"], monkeypatch, capsys)
    assert code == 0, stderr
    again = json.loads((out / "results.json").read_text())
    assert again["meta"]["resumed_rows"] == 1
    assert [r["acc"] for r in again["rows"]] == [r["acc"] for r in data["rows"]]
    code, _, stderr = _run([*args, "--resume", "--steps", "3"], monkeypatch, capsys)
    assert code == 2 and "different settings: ['train']" in stderr
    code, _, stderr = _run([*args, "--resume", "--out", str(tmp_path / "new")], monkeypatch, capsys)
    assert code == 0 and "--resume: no journal.jsonl in" in stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--suite", "audio"], 2, "use text, vision or all"),
        (["--tasks", "rt_sentimnt"], 1, "did you mean 'rt_sentiment'"),
        (["--tasks", "sk_digits", "--device", "tpu9"], 1, "unknown device 'tpu9'"),
    ],
)
def test_bench_cli_errors_are_one_line(args, code, message, monkeypatch, capsys):
    got, _, stderr = _run(args, monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert got == code and len(errors) == 1 and message in errors[0]
    assert "Traceback" not in stderr


def test_bench_cli_peft_track_writes_report(tmp_path, monkeypatch, capsys):
    rows = ["text,label"] + [f"{('great', 'awful')[i % 2]} item {i},{i % 2}" for i in range(60)]
    (tmp_path / "tone.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["--track", "peft", "--tasks", str(tmp_path / "tone.csv"), "--methods", "nola"]
    args += ["--steps", "2", "--budget", "2400", "--out", str(out)]
    code, stdout, stderr = _run(args, monkeypatch, capsys)
    assert code == 0, stderr
    assert "linear probe" in stdout and "NOLA (k=100, l=100)" in stdout and "wrote" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    data = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in data["rows"]] == ["probe", "nola", "full"]
    assert data["rows"][1]["adapter_params"] == 2400  # 12 q/v matrices × (k + l)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--budget", "100"], 2, "--budget and --set belong to --track peft"),
        (["--track", "peft", "--set", "mos.bogus=1"], 1, "unknown mos option 'bogus'"),
        (["--track", "peft", "--set", "mos=1"], 2, "is not METHOD.KEY=VALUE"),
        (["--track", "peft", "--methods", "lorra"], 1, "did you mean 'lora'"),
        (["--track", "lint"], 2, "unknown track 'lint'"),
        (["--track", "peft", "--finetune", "full"], 2, "--finetune belongs to --track merge"),
        (["--suite", "llm", "--budget", "100"], 2, "--budget and --set belong to --track peft"),
        (["--suite", "llm", "--track", "peft", "--finetune", "lora"], 2, "--finetune belongs"),
        (["--track", "peft", "--resume"], 2, "--resume belongs to the merge track's runs"),
        (["--suite", "llm", "--resume"], 2, "--resume belongs to the merge track's runs"),
    ],
)
def test_bench_cli_peft_errors_are_one_line(args, code, message, tmp_path, monkeypatch, capsys):
    got, _, stderr = _run([*args, "--out", str(tmp_path / "o")], monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert got == code and len(errors) == 1 and message in errors[0], stderr
    assert not (tmp_path / "o").exists()


def test_full_profile_json_is_one_document_with_the_llm_suite(tmp_path, monkeypatch, capsys):
    """``--full --json`` runs the merge profile and then the LLM suite: stdout must be one JSON
    document holding both (it used to print two documents back to back)."""
    import types

    import splice.bench.llm as llm
    import splice.bench.llm_report as llm_report
    import splice.bench.report as report
    import splice.bench.runner as runner

    cfg = types.SimpleNamespace(tasks=["t"], model_dump=lambda mode: {"tasks": ["t"]})
    monkeypatch.setattr(runner, "configure", lambda profile, **kw: cfg)
    monkeypatch.setattr(runner, "run_bench", lambda c, console, journal: {"rows": [1]})
    monkeypatch.setattr(report, "write_report", lambda r, out: [out / "results.md"])
    monkeypatch.setattr(llm, "configure_llm", lambda profile, **kw: cfg)
    monkeypatch.setattr(llm, "run_llm", lambda c, say: {"rows": [2]})
    monkeypatch.setattr(llm_report, "write_llm_report", lambda r, out: [out / "llm.md"])
    code, out, err = run_cli(
        monkeypatch, capsys, "bench", "--full", "--json", "--out", str(tmp_path)
    )
    assert code == 0, err
    assert json.loads(out) == {"merge": {"rows": [1]}, "llm": {"rows": [2]}}
    assert "then the LLM suite (SmolLM2)" in err  # the up-front estimate covers only the first
