"""fashion_mnist: Zalando's 28×28 clothing images, 10 classes (Debian dataset-fashion-mnist).

The official train (60k) and test (10k) files are pooled and re-split like every other task.
"""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Source, Task
from splice.data.tasks._images import read_idx

_DIR = "/usr/share/datasets/fashion-mnist"
_HASHES = {
    "train-images": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_IDX = {"images": "idx3", "labels": "idx1"}
SOURCES = {
    part: Source(
        "dataset-fashion-mnist", f"{_DIR}/{part}-{_IDX[part.split('-')[1]]}-ubyte.gz", sha256
    )
    for part, sha256 in _HASHES.items()
}
CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def read() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    parts = {f: read_idx(s.locate()) for f, s in SOURCES.items()}
    x = np.concatenate([parts["train-images"], parts["t10k-images"]])
    y = np.concatenate([parts["train-labels"], parts["t10k-labels"]])
    return x, y.astype(np.int64), CLASSES


TASKS.register("fashion_mnist")(
    Task(
        "fashion_mnist",
        "image",
        read,
        key="".join(_HASHES.values()),
        description="clothing type, 28×28 grey, 10 classes (Debian dataset-fashion-mnist)",
        license="MIT (Zalando), per debian/copyright",
    )
)
