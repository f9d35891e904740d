"""animal_mnist: 10,000 white-on-black 28×28 animal silhouettes, 10 classes (animal-mnist 0.4).

The package stores gzip'd numpy pickles and its loader imports tensorflow, so the files are
read directly: sha256-pinned, then unpickled with numpy-only globals.
"""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Source, Task
from splice.data.tasks._images import read_numpy_pickle

_DIR = "data/Animal_MNIST"
IMAGES = Source(
    "animal-mnist",
    f"{_DIR}/animal_data_version_3.gz",
    "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    module="animal_mnist",
    version="0.4",
)
LABELS = Source(
    "animal-mnist",
    f"{_DIR}/animal_label_version_3.gz",
    "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
    module="animal_mnist",
    version="0.4",
)
# README order; the id → name mapping is not verified against the images.
CLASSES = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)


def read() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    x = read_numpy_pickle(IMAGES).astype(np.uint8).reshape(-1, 28, 28)
    y = read_numpy_pickle(LABELS).astype(np.int64).reshape(-1)
    return x, y, CLASSES


TASKS.register("animal_mnist")(
    Task(
        "animal_mnist",
        "image",
        read,
        key=IMAGES.sha256 + LABELS.sha256,
        description="animal silhouette, 28×28 grey, 10 classes (animal-mnist)",
        license="MIT",
    )
)
