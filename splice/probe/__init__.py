"""The probing toolkit: find a model's blocks, capture / add to / replace their outputs.

Shared by the analyses (:mod:`splice.analysis`), LAPT training and any stage that reads or
steers hidden states. Small on purpose: :class:`Hooks` (a context manager; nothing leaks),
:func:`blocks` / :func:`check_layers`, :func:`select` for positions, and :func:`knn_loo`.
"""

from __future__ import annotations

from splice.probe.blocks import block_path, blocks, check_layers
from splice.probe.hooks import Capture, Hooks, Positions, Replace, select
from splice.probe.knn import knn_loo

__all__ = [
    "Capture",
    "Hooks",
    "Positions",
    "Replace",
    "block_path",
    "blocks",
    "check_layers",
    "knn_loo",
    "select",
]
