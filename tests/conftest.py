"""Shared test setup: offline, deterministic, single-threaded-friendly."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the input digest cache (splice.io._hash.DigestCache) is off unless a test turns it on
os.environ["SPLICE_DIGEST_CACHE"] = "off"
# Under pytest-xdist (`./run.sh test` runs `-n auto`), the cores are shared out among the
# workers before torch starts its thread pools: N workers × all-cores threads each would
# oversubscribe the box and leave OpenMP threads spin-waiting for cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)


def spy_hashed_files(monkeypatch, module) -> list:
    """Record the paths ``module.hash_files`` reads from disk (it still hashes them)."""
    from pathlib import Path

    read: list[Path] = []
    original = module.hash_files

    def spy(paths):
        paths = list(paths)
        read.extend(paths)
        return original(paths)

    monkeypatch.setattr(module, "hash_files", spy)
    return read
