"""Progress of a benchmark run: an up-front estimate, then one line per phase.

Each line gives the time since the run started and an ETA for the rest, and is written as
soon as its phase ends, on any stream: a terminal, a pipe or a log file (rich's live bars
render nothing on a non-terminal until the run ends, so they are only added on terminals, for
the steps inside a phase). The ETA scales the remaining phases' estimates by how fast the
finished phases of the same kind (training, evaluation) ran against their estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Phase", "Progress", "clock"]


@dataclass
class Phase:
    """One step of the run's plan: ``est`` seconds expected on this machine."""

    key: str
    kind: str  # "train", "evaluate" or "continual"
    est: float
    actual: float | None = None


def clock(seconds: float) -> str:
    """``83.4`` → ``1:23``; hours as ``1:02:03``."""
    s = max(0, round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """Lines on ``console`` (a rich Console, or None for silence) against a plan of phases."""

    def __init__(self, console: Any | None, now: Callable[[], float]) -> None:
        self.console = console
        self.now = now
        self.start = now()
        self.phases: dict[str, Phase] = {}
        self.bar = None
        if console is not None and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as Bars

            self.bar = Bars(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=True,
            )

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def plan(self, phases: Sequence[Phase]) -> None:
        self.phases.update((p.key, p) for p in phases)

    def say(self, text: str) -> None:
        """One line, written now (rich prints above its live bars on a terminal)."""
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _scale(self, kind: str) -> float:
        done = [p for p in self.phases.values() if p.actual is not None and p.est >= 0.5]
        same = [p for p in done if p.kind == kind] or done
        est = sum(p.est for p in same)
        return sum(p.actual for p in same) / est if est else 1.0  # type: ignore[misc]

    def eta(self) -> float:
        """Seconds left: the remaining phases' estimates, scaled per kind."""
        return sum(p.est * self._scale(p.kind) for p in self.phases.values() if p.actual is None)

    def done(self, key: str, text: str, seconds: float) -> None:
        """Mark phase ``key`` finished after ``seconds`` and print ``text`` with time and ETA."""
        if key in self.phases:
            self.phases[key].actual = seconds
        elapsed = self.now() - self.start
        self.say(f"[{clock(elapsed):>7} | ETA {clock(self.eta()):>7}] {text}")

    @contextmanager
    def steps(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """Yields ``advance()``: a live bar on terminals, nothing elsewhere."""
        if self.bar is None:
            yield lambda: None
            return
        tid = self.bar.add_task(description, total=total)
        try:
            yield lambda: self.bar.update(tid, advance=1)
        finally:
            self.bar.remove_task(tid)
