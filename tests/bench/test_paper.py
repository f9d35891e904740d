"""The paper protocol on the tiny BERT: rows, kinds, the transductive table, estimate, CLI."""

from __future__ import annotations

import json

import pytest

from splice.bench.bn_repair import NO_BN
from splice.bench.finetune import FinetuneConfig
from splice.bench.paper import PaperConfig, WEMoESettings, configure_paper, estimate, run_paper
from splice.bench.paper_report import paper_markdown, write_paper_report
from splice.bench.per_task import schedule_params, task_configs
from splice.bench.report import summarize
from splice.errors import SpliceError


def _config(tiny, **kw) -> PaperConfig:
    model_dir, paths = tiny
    base = {
        "tasks": tuple(paths),
        "train": FinetuneConfig(finetune="full", steps=30, batch_size=16, lr=1e-3),
        "per_task": {"topic": {"steps": 20}},
        "methods": ("linear", "task_arithmetic", "regmean"),
        "lambda_grid": (0.3, 1.0),
        "schedules": {"adamerging": {"steps": 2}},
        "transductive": ("adamerging",),
        "wemoe": WEMoESettings(steps=2, batch_size=4),
        "caps": (90, 20, 40),
        "text_model": str(model_dir),
    }
    return PaperConfig(**(base | kw))


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPLICE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield run_paper(_config(tiny))
    finally:
        mp.undo()


def test_rows_kinds_and_per_task_steps(results):
    kinds = {r["key"]: r["kind"] for r in results["rows"]}
    assert kinds == {
        "zero_shot": "reference",
        "individual": "reference",
        "linear": "merge",
        "task_arithmetic@lambda=0.3": "merge",
        "task_arithmetic@tuned": "merge",
        "regmean": "merge",
        "emr": "per-task",
        "wemoe-inductive": "routed",
        "wemoe-transductive": "transductive",
        "adamerging@steps=2@test": "transductive",
    }
    steps = {r["task"]: r["steps"] for r in results["runs"]}
    assert steps == {"mood": 30, "topic": 20}
    extra = results["extra"]
    assert extra["emr"]["extra_params"] > 0 and extra["wemoe-inductive"]["extra_params"] > 0
    assert extra["wemoe-inductive"]["eval_time_x"] > 0
    norm = {s["key"]: s["avg_norm"][0] for s in summarize(results)}
    assert norm["individual"] == pytest.approx(1.0)
    # BERT has no batch norm: every repaired twin (3 methods + EMR) is listed as not run
    repaired = {k: v for k, v in results["skipped"].items() if "BN repair" in k}
    assert len(repaired) == 4 and set(repaired.values()) == {NO_BN}


def test_transductive_rows_only_in_their_table(results, tmp_path):
    md = paper_markdown(results)
    main, rest = md.split("## Not one dense model")
    routed, trans = rest.split("## Transductive")
    assert "transductive" not in main.split("## One merged model")[1]
    assert "transductive" not in routed
    rows = [line for line in trans.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + WEMoE entropy + AdaMerging on test inputs
    assert all("(transductive)" in r for r in rows[1:])
    paths = write_paper_report(results, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    assert data["protocol"] == "paper" and data["summary"]


def test_emr_of_one_task_is_that_task(tiny, tmp_path, monkeypatch):
    """One task: EMR rebuilds the expert exactly, so the row equals the individual row."""
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path))
    cfg = _config(tiny, tasks=tiny[1][:1], per_task={}, methods=(), transductive=(), wemoe=None)
    res = run_paper(cfg)
    acc = {r["key"]: r["acc"] for r in res["rows"]}
    assert acc["emr"] == acc["individual"]


def test_estimate_and_per_task_errors(tiny):
    seconds, plan = estimate(_config(tiny))
    keys = [p.key for p in plan]
    assert seconds > 0 and all(p.est >= 0 for p in plan)
    assert "evaluate/text/0/emr" in keys and "evaluate/text/0/adamerging@steps=2@test" in keys
    train = {p.key: p.est for p in plan if p.kind == "train"}
    assert train["train/text/0/topic"] == pytest.approx(train["train/text/0/mood"] * 20 / 30)
    with pytest.raises(SpliceError, match="not in this run"):
        task_configs(["a"], FinetuneConfig(), {"b": {"steps": 1}})
    with pytest.raises(SpliceError, match="a: "):
        task_configs(["a"], FinetuneConfig(), {"a": {"stepz": 1}})
    assert schedule_params("adamerging", "paper")["steps"] == 500
    assert schedule_params("adamerging", "short")["steps"] == 100


def test_cli_estimate_and_bad_options(tiny, monkeypatch, capsys):
    from tests.cli._run import run_cli

    model_dir, paths = tiny
    args = ["bench", "--protocol", "paper", "--tasks", ",".join(paths)]
    args += ["--text-model", str(model_dir), "--estimate"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--set", "mood.steps=5")
    assert code == 0, err
    assert "estimate" in out and "2 tasks" in out
    code, _, err = run_cli(monkeypatch, capsys, *args, "--set", "nope.steps=5")
    assert code == 2 and "not in this run" in err
    assert run_cli(monkeypatch, capsys, "bench", "--estimate")[0] == 2
    assert run_cli(monkeypatch, capsys, "bench", "--protocol", "x")[0] == 2
    assert configure_paper("quick", suite="vision").tasks[0] == "fashion_mnist"


def test_ties_rows_in_both_aggregations_and_a_batch_statistics_adamerging_repair():
    from splice.bench.paper import paper_specs

    cfg = PaperConfig(
        tasks=("mnist_5k",),
        methods=("ties", "adamerging"),
        lambda_grid=(0.3, 1.0),
        schedules={"adamerging": {"steps": 2}},
    )
    specs = {s.key: s for s in paper_specs(cfg)}
    assert sorted(specs) == [
        "adamerging@steps=2",
        "adamerging@steps=2@bn=batch@+bn",
        "ties@+bn@tuned",
        "ties@aggregate=sum@+bn@tuned",
        "ties@aggregate=sum@lambda=0.3",
        "ties@aggregate=sum@tuned",
        "ties@lambda=0.3",
        "ties@tuned",
    ]
    assert specs["ties@aggregate=sum@tuned"].tune == (0.3, 1.0)
    assert specs["adamerging@steps=2@bn=batch@+bn"].repair_bn
    assert specs["adamerging@steps=2"].params == {"steps": 2}
