"""StagedFile: files written in order through aligned staging buffers (O_DIRECT where allowed),
hashed from the staged bytes."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

import splice.io._direct as direct
from splice.io._direct import CHUNK, StagedFile

# two full chunks and a ragged tail, written in pieces that straddle chunk boundaries
SIZES = [5, CHUNK - 3, 7, CHUNK + 1000, 123_457]


def _write(path: Path, head: bytes, parts: list[bytes], sha: bool = True) -> StagedFile:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = len(head) + sum(map(len, parts))
    os.ftruncate(fd, total)
    f = StagedFile(path, fd, total, sha=sha, head=head)
    try:
        for p in parts:
            f.append(p)
    finally:
        f.close()
        os.close(fd)
    return f


@pytest.mark.parametrize("mode", ["direct", "no_direct", "einval_on_write"])
def test_bytes_and_digest_equal_the_data_and_hashlib(tmp_path: Path, monkeypatch, mode) -> None:
    if mode == "no_direct":  # a filesystem that refuses O_DIRECT at open (tmpfs)
        monkeypatch.setattr(direct, "_open_direct", lambda path: -1)
    refused: list[int] = []
    if mode == "einval_on_write":  # ...or accepts the open and refuses the writes
        real = direct._pwrite_all

        def fake_open(p: Path) -> int:
            refused.append(os.open(p, os.O_WRONLY))
            return refused[-1]

        def pwrite(fd: int, view, pos: int) -> None:
            if fd in refused:
                refused.remove(fd)  # closed by the caller: the number may come back
                raise OSError(errno.EINVAL, "Invalid argument")
            real(fd, view, pos)

        monkeypatch.setattr(direct, "_open_direct", fake_open)
        monkeypatch.setattr(direct, "_pwrite_all", pwrite)
    head = b"HEADER" * 11
    parts = [os.urandom(n) for n in SIZES]
    f = _write(tmp_path / "f", head, parts)
    data = head + b"".join(parts)
    assert (tmp_path / "f").read_bytes() == data
    assert f.digest == hashlib.sha256(data).hexdigest()
    assert not refused  # the refused descriptor was tried once, then the page cache used


def test_abandon_writes_what_was_staged_and_gives_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    head, first, rest = b"H" * 8, os.urandom(CHUNK + 77), os.urandom(5000)
    total = len(head) + len(first) + len(rest)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, total)
    f = StagedFile(path, fd, total, sha=True, head=head)
    f.append(first)
    f.abandon()
    assert not f.open
    os.pwrite(fd, rest, len(head) + len(first))  # the caller writes the rest itself
    f.close()
    os.close(fd)
    assert path.read_bytes() == head + first + rest
    assert f.digest is None


def test_head_only_is_written_by_abandon(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    f = StagedFile(path, fd, 10, sha=True, head=b"0123456789")
    f.abandon()
    os.close(fd)
    assert path.read_bytes() == b"0123456789" and f.digest is None


def test_write_errors_reach_the_caller(tmp_path: Path, monkeypatch) -> None:
    def full(fd, view, pos):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "_pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        _write(tmp_path / "f", b"h", [os.urandom(3 * CHUNK)])
