"""Continual training through the one loop: matrix, resume after a crash, bad input."""

from __future__ import annotations

import json

import pytest

from splice.errors import SpliceError
from tests.continual._bert import make_bert_and_tasks

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_bert_and_tasks(tmp_path_factory.mktemp("continual"))


def _load(setup, names, monkeypatch, tmp_path):
    from splice.data.encoders import load_encoder
    from splice.data.local import resolve_task
    from splice.data.registry import Caps, load_task

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    model_dir, paths = setup
    enc = load_encoder("text", text_model=str(model_dir), max_len=16)
    return enc, [load_task(resolve_task(str(paths[n])), Caps(40, 8, 12)) for n in names]


def _cfg(method, **kw):
    from splice.train.continual import ContinualConfig

    return ContinualConfig(method=method, steps=3, batch_size=8, **kw)


@pytest.mark.parametrize("method", ["share", "igsp", "sequential_lora", "lora_per_task"])
def test_every_method_fills_the_lower_triangle(setup, monkeypatch, tmp_path, method):
    from splice.train.continual import run_sequence

    enc, tasks = _load(setup, ["mood", "topic", "size"], monkeypatch, tmp_path)
    opts = {"k": 4} if method == "share" else {}
    run = run_sequence(enc, tasks, _cfg(method, options=opts), tmp_path / "out")
    assert [[v is not None for v in row] for row in run.R] == [
        [True, False, False], [True, True, False], [True, True, True]
    ]  # fmt: skip
    rec = json.loads((tmp_path / "out" / "continual.json").read_text())
    assert rec["method"] == method and rec["R"] == run.R and rec["stored"]["params"] > 0
    assert len(rec["metrics"]["avg_accuracy"]) == 3
    if method == "lora_per_task":  # nothing shared: re-evaluation reproduces the diagonal
        assert [run.R[2][j] for j in range(3)] == [run.R[j][j] for j in range(3)]


def test_crash_in_a_task_keeps_the_finished_ones_and_resume_matches(setup, monkeypatch, tmp_path):
    from splice.train.continual import run_sequence

    enc, tasks = _load(setup, ["mood", "topic", "size"], monkeypatch, tmp_path)
    cfg = _cfg("share", options={"k": 4})
    whole = run_sequence(enc, tasks, cfg, tmp_path / "whole")

    calls = {"n": 0}

    def crash(step, loss):  # dies in the third task's first step
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sequence(enc, tasks, cfg, tmp_path / "crashed", on_step=crash)
    kept = json.loads((tmp_path / "crashed" / "state" / "progress.json").read_text())
    assert kept["tasks"] == ["mood", "topic"]
    again = run_sequence(enc, tasks, cfg, tmp_path / "crashed", resume=True)
    assert again.resumed == ["mood", "topic"]
    assert again.R == whole.R  # same seeds per task: the resumed run is the uninterrupted one


def test_bad_sequences_and_resumes_are_refused(setup, monkeypatch, tmp_path):
    from splice.train.continual import run_sequence

    enc, tasks = _load(setup, ["mood", "topic"], monkeypatch, tmp_path)
    with pytest.raises(SpliceError, match="repeats task 'mood'"):
        run_sequence(enc, [tasks[0], tasks[1], tasks[0]], _cfg("share"))
    out = tmp_path / "out"
    run_sequence(enc, tasks[:1], _cfg("share", options={"k": 4}), out)
    before = (out / "state" / "method.safetensors").read_bytes()
    with pytest.raises(SpliceError, match=r"cannot resume with method 'igsp'.*used 'share'"):
        run_sequence(enc, tasks, _cfg("igsp"), out, resume=True)
    with pytest.raises(SpliceError, match="kk"):
        run_sequence(enc, tasks, _cfg("share", options={"kk": 4}), out, resume=True)
    _, other = _load(setup, ["topic"], monkeypatch, tmp_path)  # 3 labels where mood had 2
    renamed = type(other[0])(**{**other[0].__dict__, "name": "mood"})
    with pytest.raises(SpliceError, match="'mood' has 3 labels but its trained head has 2"):
        run_sequence(enc, [renamed, tasks[1]], _cfg("share", options={"k": 4}), out, resume=True)
    assert (out / "state" / "method.safetensors").read_bytes() == before  # nothing lost
