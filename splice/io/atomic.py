"""Atomic directory replacement: build in a temp dir beside the destination, then swap it in.

Every writer of a directory in splice (checkpoints, adapters, training checkpoints, bench cache
entries) goes through here, so a kill at any point leaves the old version or the new one whole
at the destination, never a mix, and temp dirs of dead processes are tidied on the next write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "clean_stale_temps", "new_temp_dir", "swap_in"]

_TMP_MARK = ".splice-tmp-"
_OLD_MARK = ".splice-old-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(dest: Path) -> None:
    """Tidy what writers killed mid-way left beside ``dest``.

    Temp dirs of dead processes are removed. A previous version set aside by the two-rename
    fallback of :func:`swap_in` is put back if ``dest`` is missing, removed otherwise.
    """
    for mark in (_OLD_MARK, _TMP_MARK):
        for tmp in sorted(dest.parent.glob(f".{dest.name}{mark}*")):
            pid = tmp.name.rsplit("-", 2)[-2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if mark == _OLD_MARK and not dest.exists():
                tmp.rename(dest)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def new_temp_dir(dest: Path) -> Path:
    """Create the parent of ``dest`` if needed, tidy stale temps, and make a fresh temp dir
    beside ``dest`` (same filesystem, so the final rename is atomic), named for this process."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    tmp = dest.parent / f".{dest.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def swap_in(tmp: Path, dest: Path) -> None:
    """Put the finished temp dir ``tmp`` in place of ``dest``, atomically where the OS allows.

    An existing ``dest`` is exchanged with ``tmp`` in one ``renameat2`` call, then the old
    version (now under the temp name) is deleted: a kill at any point leaves either version
    whole at ``dest``. Without ``renameat2`` the old version is first renamed aside under a
    name :func:`clean_stale_temps` restores if the process dies before the second rename.
    """
    if not dest.exists():
        tmp.rename(dest)
    elif _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = dest.parent / f".{dest.name}{_OLD_MARK}{tmp.name.split(_TMP_MARK)[1]}"
        dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError:
            old.rename(dest)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """``with atomic_dir(dest) as tmp:`` fill ``tmp``; on a clean exit it replaces ``dest``.

    An exception (or Ctrl-C) inside the block removes ``tmp`` and leaves ``dest`` as it was.
    """
    dest = Path(dest)
    tmp = new_temp_dir(dest)
    try:
        yield tmp
        swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
