"""Fault injection on the atomic writer: the destination is all-or-nothing, whatever happens.

A child process writes a known checkpoint over an existing one and is killed (SIGKILL,
SIGINT) at random moments or at exact points (shard assembly, index write, final rename), or
hits ENOSPC / EACCES. Afterwards the destination must be the previous version or the complete
new one — never a partial file under a final name — and the next writer must clean leftovers.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splice.io import open_checkpoint
from splice.io.atomic import clean_stale_temps
from tests.reliability.writer_child import expected

CHILD = Path(__file__).with_name("writer_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(dest: Path, version: int, fault: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), str(dest), str(version), fault],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _version_of(dest: Path) -> int | None:
    """Which complete version ``dest`` holds (validated tensor by tensor), or None if absent."""
    if not dest.exists():
        return None
    ckpt = open_checkpoint(dest)
    for version in (1, 2):
        want = expected(version)
        if list(ckpt) == list(want) and all(torch.equal(ckpt[k], v) for k, v in want.items()):
            return version
    raise AssertionError(f"{dest} holds neither version: partial or corrupt output")


def _leftovers(dest: Path) -> list[str]:
    return [p.name for p in dest.parent.iterdir() if p.name != dest.name]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    assert _run(d, 1, "none").returncode == 0
    return d


@pytest.mark.parametrize(
    "fault", ["kill_at_shard", "kill_at_index", "kill_at_swap", "kill_at_rename_fallback"]
)
def test_sigkill_at_exact_points_keeps_previous_version(dest: Path, fault: str) -> None:
    before = _digest(dest)
    proc = _run(dest, 2, fault)
    assert proc.returncode == -signal.SIGKILL
    if fault == "kill_at_rename_fallback":  # old version set aside; the next writer restores it
        assert not dest.exists()
        clean_stale_temps(dest)
    assert _version_of(dest) == 1 and _digest(dest) == before
    if fault != "kill_at_rename_fallback":
        assert _leftovers(dest), "the killed writer should have left its temp dir"
    assert _run(dest, 2, "none").returncode == 0
    assert _version_of(dest) == 2 and _leftovers(dest) == []


@pytest.mark.parametrize(
    ("fault", "message"), [("enospc", "No space left"), ("eacces", "cannot create")]
)
def test_io_errors_are_one_line_and_leave_previous_version(
    dest: Path, fault: str, message: str
) -> None:
    before = _digest(dest)
    proc = _run(dest, 2, fault)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert _digest(dest) == before and _leftovers(dest) == []


def _signal_at_random(dest: Path, sig: int, rng: random.Random) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(dest), "2", "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "started": imports done, temp dir exists
    time.sleep(rng.uniform(0.0, 0.35))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert _version_of(dest) in (1, 2)
    if sig == signal.SIGINT:
        assert _leftovers(dest) == [], "Ctrl-C must clean up its temp dir"
    assert _run(dest, 2, "none").returncode == 0
    assert _version_of(dest) == 2 and _leftovers(dest) == []


def _random_runs(dest: Path, sig: int, runs: int) -> None:
    rng = random.Random(1234 + sig)
    for _ in range(runs):
        assert _run(dest, 1, "none").returncode == 0
        _signal_at_random(dest, sig, rng)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_signal_at_random_points(dest: Path, sig: int) -> None:
    _random_runs(dest, sig, runs=3)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_signal_at_random_points_many(dest: Path, sig: int) -> None:
    _random_runs(dest, sig, runs=20)


def test_stale_output_with_extra_shards_is_replaced_whole(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    for i in range(7):
        (dest / f"model-{i + 1:05d}-of-00007.safetensors").write_bytes(b"stale")
    (dest / "model.safetensors.index.json").write_text("{}")
    assert _run(dest, 2, "none").returncode == 0
    assert _version_of(dest) == 2
    names = sorted(p.name for p in dest.iterdir())
    assert all("of-00004" in n for n in names if n.startswith("model-"))
    assert "model-00007-of-00007.safetensors" not in names
