"""Every malformed input → typed one-line error, exit 1, no traceback, no hang, bounded memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.corpus.generate import CANARY, build_corpus

HERE = Path(__file__).parent


def test_whole_corpus_is_refused_cleanly(tmp_path: Path) -> None:
    cases = build_corpus(tmp_path / "corpus")
    assert len(cases) >= 100
    assert len({c.id for c in cases}) == len(cases)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([c.__dict__ for c in cases]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_cases.py"), str(manifest)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    expect = {c.id: c.expect for c in cases}
    failures = []
    for r in report["results"]:
        lines = r["stderr"].strip().splitlines()
        ok = (
            r["code"] == 1
            and len(lines) == 1
            and lines[0].startswith("error: ")
            and "Traceback" not in r["stderr"]
            and re.search(expect[r["id"]], lines[0])
            and r["seconds"] < 10
        )
        if not ok:
            failures.append((r["id"], r["code"], r["stderr"][-300:]))
    assert not failures, failures
    assert not (tmp_path / "corpus" / CANARY).exists(), "a pickle payload executed"
    assert report["peak_rss_mib"] < 1500
    out = tmp_path / "corpus" / "out"
    assert not out.exists() or list(out.iterdir()) == [], "a refused merge left output behind"
    a = tmp_path / "corpus" / "models" / "a" / "model.safetensors"
    assert a.stat().st_size > 0 and sorted(p.name for p in a.parent.iterdir()) == [a.name]
