"""The bench's row journal: an interrupted run resumed with ``--resume`` equals an unbroken one
and does not evaluate its finished rows again; other settings are refused."""

from __future__ import annotations

import json

import pytest

from splice.bench import rows
from splice.bench.finetune import FinetuneConfig
from splice.bench.journal import Journal
from splice.bench.runner import BenchConfig, run_bench
from splice.errors import SpliceError, UsageError


def test_journal_round_trip_torn_line_restart_and_other_settings(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, {"steps": 5})
    j.put("evaluate/text/0/ties", {"acc": {"a": 0.5}, "secs": 0.1, "params": {}})
    with path.open("a") as f:
        f.write('{"key": "evaluate/text/0/lin')  # the line being written when it stopped
    back = Journal(path, {"steps": 5}, resume=True)
    assert "evaluate/text/0/ties" in back and "evaluate/text/0/linear" not in back
    assert back.get("evaluate/text/0/ties")["acc"] == {"a": 0.5} and back.reused == 1
    assert back.get("evaluate/text/0/linear") is None and back.reused == 1
    assert back.row("evaluate/text/0/ties", lambda: 1 / 0)["secs"] == 0.1  # read, not computed
    assert back.row("evaluate/text/0/linear", lambda: {"skip": "x"}) == {"skip": "x"}
    assert Journal(path, {"steps": 5}, resume=True).get("evaluate/text/0/linear") == {"skip": "x"}
    with path.open("a") as f:
        f.write("[1]\n")  # a complete line that is no row: damaged by hand, not by a stop
    with pytest.raises(SpliceError, match=r"line 4 of .* is not a journal row"):
        Journal(path, {"steps": 5}, resume=True)
    with pytest.raises(UsageError, match=r"different settings: \['steps'\]"):
        Journal(path, {"steps": 6}, resume=True)
    fresh = Journal(path, {"steps": 6})  # without --resume: started over
    assert fresh.rows == {} and path.read_text().splitlines() == ['{"settings": {"steps": 6}}']
    assert Journal(tmp_path / "none.jsonl", {"a": 1}, resume=True).rows == {}  # nothing yet


def _config(tiny) -> BenchConfig:
    model_dir, paths = tiny
    return BenchConfig(
        tasks=tuple(paths),
        methods=("task_arithmetic", "ties", "opcm"),
        learned_steps=2,
        continual_orders=1,
        train=FinetuneConfig(steps=20, batch_size=16),
        caps=(90, 20, 40),
        text_model=str(model_dir),
        lambda_grid=(0.5, 1.0),
    )


def test_an_interrupted_run_resumes_to_the_unbroken_rows(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    cfg = _config(tiny)
    whole = run_bench(cfg)

    real, calls = rows.merge_state, []

    def stop_at_ties(spec, *args, **kw):  # Ctrl-C in the third setting's merge
        calls.append(spec.method)
        if spec.method == "ties":
            raise KeyboardInterrupt
        return real(spec, *args, **kw)

    path = tmp_path / "out" / "journal.jsonl"
    monkeypatch.setattr(rows, "merge_state", stop_at_ties)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, journal=Journal(path, cfg.model_dump(mode="json")))
    kept = [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]]
    assert kept == [
        "evaluate/text/0/references",
        "evaluate/text/0/task_arithmetic",
        "evaluate/text/0/task_arithmetic@tuned",
    ]

    def counted(spec, *args, **kw):
        calls.append(spec.method)
        return real(spec, *args, **kw)

    calls.clear()
    monkeypatch.setattr(rows, "merge_state", counted)
    again = run_bench(cfg, journal=Journal(path, cfg.model_dump(mode="json"), resume=True))
    assert "task_arithmetic" not in calls  # read from the journal, not merged again
    assert again["meta"]["resumed_rows"] == 3
    assert [(r["key"], r["acc"], r["params"]) for r in again["rows"]] == [
        (r["key"], r["acc"], r["params"]) for r in whole["rows"]
    ]
    assert again["continual"] == whole["continual"]
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3 + 3 + 1  # settings, the kept rows, ties twice and opcm, the view
    done = Journal(path, cfg.model_dump(mode="json"), resume=True)
    calls.clear()
    assert run_bench(cfg, journal=done)["rows"] == again["rows"] and calls == []
