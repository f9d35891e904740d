"""The one exception type for user errors.

Every error a person can cause (a bad path, a corrupt file, a misspelled recipe key) is a
:class:`SpliceError` whose message is one line: what went wrong, where (file, tensor), and how
to fix it. The CLI prints it without a traceback and exits 1.
"""

from __future__ import annotations

__all__ = ["SpliceError", "UsageError"]


class SpliceError(Exception):
    """A user-facing error with an actionable one-line message."""

    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__(" — ".join(parts))


class UsageError(SpliceError):
    """The command line or API was called with arguments that cannot work (exit 2)."""

    exit_code = 2
