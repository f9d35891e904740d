"""FollowHasher: SHA-256 of files followed through the page cache as they are read/written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from splice.io._hash import FollowHasher, hash_files


def _file(tmp_path: Path, n: int = 3_000_000) -> tuple[Path, bytes]:
    data = os.urandom(n)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    return path, data


def test_in_order_reads_give_the_file_digest_and_second_passes_are_ignored(tmp_path):
    path, data = _file(tmp_path)
    h = FollowHasher()
    h.track(path, ready=100)  # a header, hashed at once
    for off in range(100, len(data), 700_000):
        h.advance(path, off, min(700_000, len(data) - off))
    h.advance(path, 100, 700_000)  # a second pass over the same bytes
    assert h.digest(path, len(data)) == hashlib.sha256(data).hexdigest()
    assert hash_files([path])[str(path)] == hashlib.sha256(data).hexdigest()
    h.close()


def test_out_of_order_incomplete_or_shrunk_files_are_left_to_a_full_read(tmp_path):
    path, data = _file(tmp_path)
    h = FollowHasher()
    h.track(path)
    h.advance(path, 1_000, 10)  # skips bytes 0..999: not in order
    assert h.digest(path, len(data)) is None
    h.track(path)
    h.advance(path, 0, len(data) // 2)
    assert h.digest(path, len(data)) is None  # only half was read
    h.track(path)
    h.advance(path, 0, len(data) + 10)  # claims bytes past the end of the file
    assert h.digest(path, len(data) + 10) is None
    assert h.digest(tmp_path / "untracked", 5) is None
    h.close()
