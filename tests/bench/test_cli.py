"""`splice bench` on the command line: files written, table printed, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SPLICE = [sys.executable, "-c", "from splice.cli import main; main()"]


def _run(args, tmp_path):
    env = {**os.environ, "SPLICE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*SPLICE, "bench", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_bench_cli_writes_report_for_local_tasks(tmp_path):
    for name, words in (("spam", ("buy now", "hello friend")), ("tone", ("great", "awful"))):
        rows = ["text,label"] + [
            f"{words[i % 2]} item {i},{i % 2}" for i in range(60)
        ]  # two separable classes
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    tasks = f"{tmp_path / 'spam.csv'},{tmp_path / 'tone.csv'}"
    res = _run(
        ["--tasks", tasks, "--steps", "2", "--methods", "task_arithmetic", "--out", str(out)],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "task_arithmetic" in res.stdout and "individual" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    data = json.loads((out / "results.json").read_text())
    assert list(data["tasks"]) == ["spam", "tone"]
    assert data["config"]["train"]["steps"] == 2


def test_bench_cli_usage_errors_are_one_line(tmp_path):
    res = _run(["--suite", "audio"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "use text, vision or all" in res.stderr
    res = _run(["--tasks", "rt_sentimnt"], tmp_path)
    assert res.returncode == 1 and "did you mean 'rt_sentiment'" in res.stderr
    res = _run(["--tasks", "sk_digits", "--device", "tpu9"], tmp_path)
    assert res.returncode == 1 and "unknown device 'tpu9'" in res.stderr
    assert "Traceback" not in res.stderr
