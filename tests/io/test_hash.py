"""FollowHasher: SHA-256 of files followed through the page cache as they are read/written;
DigestCache: digests remembered across runs while a file's stat is unchanged."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from splice.io._hash import DigestCache, FollowHasher, hash_files


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


def _later() -> int:
    """A hash start 3 s after now: the file counts as quiet (its ctime is older than 2 s)."""
    return time.time_ns() + 3_000_000_000


def test_digest_cache_remembers_across_instances_and_equals_hashlib(tmp_path):
    path, data = _file(tmp_path)
    cache = DigestCache(tmp_path / "c" / "sha.json")
    digest = hash_files([path])[str(path)]
    cache.put(path, cache.stamp(path), _later(), digest)
    cache.save()
    again = DigestCache(tmp_path / "c" / "sha.json")
    assert again.get(path) == hashlib.sha256(data).hexdigest()
    assert again.get(tmp_path / "other") is None


@pytest.mark.parametrize("change", ["same_bytes_mtime_restored", "replaced", "chmod"])
def test_digest_cache_entry_is_dropped_when_the_file_changes(tmp_path, change):
    path, data = _file(tmp_path)
    cache = DigestCache(tmp_path / "sha.json")
    cache.put(path, cache.stamp(path), _later(), hashlib.sha256(data).hexdigest())
    cache.save()
    st = path.stat()
    time.sleep(0.02)  # past the filesystem's clock tick
    if change == "same_bytes_mtime_restored":  # rewritten in place, mtime set back
        with open(path, "r+b") as f:
            f.write(b"X")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "replaced":  # another inode of the same size and mtime
        other = tmp_path / "new.bin"
        other.write_bytes(os.urandom(len(data)))
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, path)
    else:
        os.chmod(path, 0o600)
    assert DigestCache(tmp_path / "sha.json").get(path) is None


def test_digest_cache_keeps_only_quiet_unchanged_files_and_survives_corruption(tmp_path):
    path, data = _file(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    cache = DigestCache(tmp_path / "sha.json")
    cache.put(path, cache.stamp(path), time.time_ns(), digest)  # written just now: racy
    before = cache.stamp(path)
    assert before is not None
    cache.put(path, [*before[:2], before[2] + 1, *before[3:]], _later(), digest)  # stat moved
    cache.put(tmp_path / "gone", None, _later(), digest)
    cache.save()
    assert not (tmp_path / "sha.json").exists()  # nothing worth saving
    (tmp_path / "sha.json").write_text("{not json")
    cache = DigestCache(tmp_path / "sha.json")  # unreadable: empty, no error
    assert cache.get(path) is None
    cache.put(path, cache.stamp(path), _later(), digest)
    cache.save()
    assert DigestCache(tmp_path / "sha.json").get(path) == digest


def test_digest_cache_location_and_off_switch(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLICE_DIGEST_CACHE", raising=False)
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "sc"))
    assert DigestCache.default().path == tmp_path / "sc" / "sha256.json"
    monkeypatch.delenv("SPLICE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DigestCache.default().path == tmp_path / "xdg" / "splice" / "sha256.json"
    monkeypatch.setenv("SPLICE_DIGEST_CACHE", str(tmp_path / "d.json"))
    assert DigestCache.default().path == tmp_path / "d.json"
    for off in ("off", "0", "", "false"):
        monkeypatch.setenv("SPLICE_DIGEST_CACHE", off)
        assert DigestCache.default() is None
