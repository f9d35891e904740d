"""The PEFT track's rows in worker processes: ``workers`` rows at once, one torch thread each.

Every row seeds itself (:func:`splice.bench.finetune.train` seeds torch and the batch order
from the row's seed; the probe its head), and every process of the track computes on one
torch thread, so neither where nor in what order a row runs changes a number: ``--workers 1``
and ``--workers 2`` write the same results (tests/bench/test_peft.py). The workers are forked
once the backbones are loaded and the train splits tokenised, so they share those pages
instead of loading them again; the rows are handed out longest estimate first and come back
as they finish, and the parent prints each row's lines then. On a CUDA device the rows run
in the one process (a forked process cannot use the parent's CUDA context).
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.bench.peft_rows import Task, run_cached, run_row
from splice.bench.progress import Progress

__all__ = ["Job", "PoolProgress", "apart", "makespan", "run_job", "run_jobs", "workers_for"]


@dataclass
class Job:
    """One row on one task, as a worker runs it."""

    index: int  # the row's place in the results
    row: dict[str, Any]
    task: Task
    plan: dict[str, Any]
    head_lr: float
    path: Path  # its cache entry
    est: float  # seconds, for the order and the ETA
    at: str  # "text/wordnet_supersense", for its lines


def workers_for(requested: int, device: str) -> int:
    """The worker processes a run uses: ``requested``, at most one per CPU, 1 off the CPU."""
    if not device.startswith("cpu") or not hasattr(os, "fork"):
        return 1
    return max(1, min(requested, os.cpu_count() or 1))


def makespan(seconds: Sequence[float], workers: int) -> float:
    """When the last of these jobs ends on ``workers`` workers, longest first (LPT)."""
    loads = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + s)
    return max(loads)


def apart(order: Sequence[int], keys: Sequence[str]) -> list[int]:
    """``order`` with no two neighbours of one key where another key can go between: a
    method's rows on two suites start one after the other, not together (two R-AMT rows at
    once ran 2-3x slower each on the 2-core dev box: both are bound by memory traffic)."""
    left, out = list(order), []
    while left:
        k = next((j for j, i in enumerate(left) if not out or keys[i] != keys[out[-1]]), 0)
        out.append(left.pop(k))
    return out


class PoolProgress(Progress):
    """:class:`Progress` whose ETA is the remaining phases' makespan over the workers."""

    workers = 1

    def eta(self) -> float:
        left = [p.est * self._scale(p.kind) for p in self.phases.values() if p.actual is None]
        return makespan(left, self.workers)


def run_job(job: Job) -> tuple[dict[str, Any], list[str], float]:
    """The job's row filled in (cached, or trained), its progress lines and its seconds."""
    start, lines = time.perf_counter(), []

    def say(text: str) -> None:
        lines.append(f"          {job.at}: {text}")

    row = dict(job.row)
    run_cached(row, job.path, lambda: run_row(job.task, job.plan, job.head_lr, say))
    return row, lines, time.perf_counter() - start


_JOBS: list[Job] = []  # set by the parent just before the workers fork; read by them


def _work(i: int) -> tuple[dict[str, Any], list[str], float]:
    return run_job(_JOBS[i])


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_jobs(jobs: list[Job], workers: int) -> Iterator[tuple[Job, dict, list[str], float]]:
    """Every job's :func:`run_job` outcome, as the jobs finish (in order with one worker)."""
    global _JOBS
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, *run_job(job)
        return
    _JOBS = jobs
    order = apart(sorted(range(len(jobs)), key=lambda i: -jobs[i].est),
                  [job.plan["key"] for job in jobs])  # fmt: skip
    pool = ProcessPoolExecutor(min(workers, len(jobs)), multiprocessing.get_context("fork"),
                               initializer=_one_thread)  # fmt: skip
    try:
        futures = {pool.submit(_work, i): i for i in order}
        for done in as_completed(futures):
            yield jobs[futures[done]], *done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOBS = []
