"""sk_digits: scikit-learn's bundled 8×8 digits (UCI optdigits, 1,797 images, 0–16 grey levels)."""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Source, Task

DIGITS = Source(
    "scikit-learn",
    "datasets/data/digits.csv.gz",
    "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
    module="sklearn",
)
CLASSES = tuple(str(d) for d in range(10))


def read() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    rows = np.loadtxt(DIGITS.locate(), delimiter=",", dtype=np.int64)  # 64 pixels + label
    pixels = np.rint(rows[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return pixels, rows[:, 64], CLASSES


TASKS.register("sk_digits")(
    Task(
        "sk_digits",
        "image",
        read,
        key=DIGITS.sha256,
        description="handwritten digit, 8×8, 10 classes (scikit-learn bundled optdigits)",
        license="BSD (scikit-learn); UCI optdigits",
    )
)
