"""``splice bench``: an offline benchmark of fine-tuning and merging on packaged models and data.

Text tasks fine-tune all-MiniLM-L6-v2, image tasks EfficientNet-Lite0 (both shipped as pip
packages); data come from pinned pip and Debian packages. Each task is fine-tuned (LoRA by
default), then the zero-shot, individual and every registered merge method are evaluated and
reported as a table, JSON and a plot. See docs/bench.md.
"""

from __future__ import annotations

from splice._registry import lazy_attributes

_LAZY = {
    "BenchConfig": "splice.bench.runner",
    "PROFILES": "splice.bench.runner",
    "run_bench": "splice.bench.runner",
    "FinetuneConfig": "splice.bench.finetune",
    "run_recipe": "splice.bench.learned_recipe",
    "write_report": "splice.bench.report",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
