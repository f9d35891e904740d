"""Shared test setup: offline, deterministic, single-threaded-friendly."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the input digest cache (splice.io._hash.DigestCache) is off unless a test turns it on
os.environ["SPLICE_DIGEST_CACHE"] = "off"


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
