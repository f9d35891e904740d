"""SHA-256 of files: read in 1 MB blocks, or followed from the page cache as they are read or
written (hashlib releases the GIL, so a thread overlaps), and remembered across runs while a
file's stat is unchanged (:class:`DigestCache`)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def hash_files(paths: Iterable[Path]) -> dict[str, str]:
    """``{str(path): sha256 hex}`` of each file."""
    out = {}
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        out[str(p)] = h.hexdigest()
    return out


class FollowHasher:
    """SHA-256 of files hashed from the page cache right behind the code that reads or
    writes them, in one worker thread, so that code never waits for a hash.

    ``advance(path, offset, n)`` says bytes ``[offset, offset + n)`` were just read or written;
    ranges that continue a file's frontier let the worker hash up to it (1 MB ``pread``s of
    pages that are still cached: no second disk read, memory one buffer). A range past the
    frontier means the file is not visited in order: it is left to :func:`hash_files` at the
    end. A range before it (a second pass) is ignored. The digest equals the file's SHA-256
    when the bytes did not change meanwhile, which callers check (stat before and after).
    """

    _CHUNK = _BLOCK

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._files: dict[Path, list[Any]] = {}  # path -> [sha, hashed, frontier, in order]
        self._closed = False
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="splice-sha", daemon=True)
        self._worker.start()

    def track(self, path: Path, ready: int = 0) -> None:
        """Follow ``path``; its first ``ready`` bytes (a header) may be hashed at once."""
        with self._cv:
            self._files[Path(path)] = [hashlib.sha256(), 0, ready, True]
            self._cv.notify()

    def advance(self, path: Path, offset: int, n: int) -> None:
        with self._cv:
            state = self._files.get(Path(path))
            if state is None or not state[3] or offset < state[2]:
                return
            if offset > state[2]:
                state[3] = False
            else:
                state[2] += n
                self._cv.notify()

    def digest(self, path: Path, size: int) -> str | None:
        """The hex digest once the worker caught up, if every byte up to ``size`` came in
        order; else None (hash the file with :func:`hash_files`)."""
        with self._cv:
            state = self._files.get(Path(path))
            while state is not None and state[3] and state[1] < state[2] and not self._error:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            if state is None or not state[3] or state[1] != size:
                return None
            return state[0].hexdigest()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()

    def _next(self) -> tuple[Path, list[Any]] | None:
        for path, state in self._files.items():
            if state[3] and state[1] < state[2]:
                return path, state
        return None

    def _run(self) -> None:
        buf = bytearray(self._CHUNK)
        view = memoryview(buf)
        fds: dict[Path, int] = {}
        try:
            while True:
                with self._cv:
                    while (job := self._next()) is None and not self._closed:
                        self._cv.wait()
                    if job is None:
                        return
                    path, state = job
                    start, n = state[1], min(self._CHUNK, state[2] - state[1])
                try:
                    if path not in fds:
                        fds[path] = os.open(path, os.O_RDONLY)
                    got = os.preadv(fds[path], [view[:n]], start)
                except OSError:
                    got = -1
                if got != n:  # unreadable or shrank under us: left to a full read at the end
                    with self._cv:
                        state[3] = False
                        self._cv.notify_all()
                    continue
                state[0].update(view[:n])  # only this thread touches the hash
                with self._cv:
                    state[1] += n
                    self._cv.notify_all()
        except BaseException as e:  # reported to the next digest()
            with self._cv:
                self._error = e
                self._cv.notify_all()
        finally:
            for fd in fds.values():
                os.close(fd)


CACHE_ENV = "SPLICE_DIGEST_CACHE"
_QUIET_NS = 2_000_000_000


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestCache:
    """SHA-256 of files remembered across runs (a JSON file), so that inputs merged again are
    not hashed again.

    An entry is trusted only while the file's ``(st_dev, st_ino, st_size, st_mtime_ns,
    st_ctime_ns)`` are all unchanged. Any write to a file, or a replacement of it (another
    inode), changes its ctime, which no user call can set back; so a hit is the file's digest
    on a local filesystem. A digest is remembered only when the file's stat was the same before
    and after it was hashed, and its ctime at least 2 s older than the hash's start (a write in
    the same clock tick as the first stat could otherwise go unseen). Filesystems whose ctime
    is not kept by the server (some network mounts) should turn it off: ``SPLICE_DIGEST_CACHE=off``.

    Location: ``$SPLICE_DIGEST_CACHE`` (a file path), else ``$SPLICE_CACHE/sha256.json``,
    else ``$XDG_CACHE_HOME/splice/sha256.json``, else ``~/.cache/splice/sha256.json``.
    """

    MAX_ENTRIES = 20_000

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._new: dict[str, list[Any]] = {}
        try:
            raw = json.loads(self.path.read_text())
            self._files: dict[str, list[Any]] = dict(raw["files"]) if raw.get("v") == 1 else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._files = {}  # missing or unreadable: start empty, never fail a merge

    @classmethod
    def default(cls) -> DigestCache | None:
        """The cache at its configured location, or None when ``SPLICE_DIGEST_CACHE`` is
        ``off``, ``0``, ``no``, ``false`` or empty."""
        env = os.environ.get(CACHE_ENV)
        if env is not None:
            if env.strip().lower() in ("", "0", "off", "no", "false"):
                return None
            return cls(Path(env).expanduser())
        if root := os.environ.get("SPLICE_CACHE"):
            base = Path(root).expanduser()
        else:
            xdg = os.environ.get("XDG_CACHE_HOME")
            base = (Path(xdg) if xdg else Path.home() / ".cache") / "splice"
        return cls(base / "sha256.json")

    @staticmethod
    def stamp(path: Path) -> list[int] | None:
        """The key an entry is trusted by, now (None: the file cannot be stat'ed)."""
        try:
            return _stat_key(os.stat(path))
        except OSError:
            return None

    def get(self, path: Path) -> str | None:
        """The remembered digest of ``path`` if the file is unchanged since it was hashed."""
        entry = self._files.get(str(Path(path).absolute()))
        now = self.stamp(path)
        return entry[5] if entry and now is not None and entry[:5] == now else None

    def put(self, path: Path, before: list[int] | None, started_ns: int, digest: str) -> None:
        """Remember ``digest`` of ``path``, hashed from ``started_ns`` on (``time.time_ns()``)
        while its stat was ``before``: only if the stat is the same now and the file had been
        quiet for 2 s when hashing started."""
        if before is None or before != self.stamp(path) or started_ns - before[4] < _QUIET_NS:
            return
        self._new[str(Path(path).absolute())] = [*before, digest]

    def save(self) -> None:
        """Write the new entries (merged with what another process may have saved meanwhile),
        atomically; errors are ignored (the cache is an optimisation)."""
        if not self._new:
            return
        try:
            fresh = DigestCache(self.path)._files
            fresh.update(self._new)
            files = dict(list(fresh.items())[-self.MAX_ENTRIES :])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"v": 1, "files": files}))
            os.replace(tmp, self.path)
            self._files, self._new = files, {}
        except OSError:
            pass
