"""Built-in benchmark tasks, one file per task, each registered in ``splice.data.TASKS``.

Text tasks run on all-MiniLM-L6-v2, image tasks on EfficientNet-Lite0. All data comes from
pinned pip or Debian packages (see docs/bench.md for sources and licenses).
"""
