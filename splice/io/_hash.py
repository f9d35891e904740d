"""SHA-256 of files: read in 1 MB blocks, or followed from the page cache as they are read or
written (hashlib releases the GIL, so a thread overlaps)."""

from __future__ import annotations

import hashlib
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
