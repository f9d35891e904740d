"""Images with dense targets [ours] for the multi-task dense methods (issue #34).

- :func:`garments` — the hierarchical backbone's *pretraining* data: fashion_mnist images
  (the first ``n`` of the pooled set) pasted at a random offset (0–4 px) on a 32×32 black
  canvas; label: the garment class.
- :func:`cluttered_digits` — the *downstream* multi-task data: an mnist_5k digit (ink scaled
  by U(0.7, 1.0)) pasted at a random offset on a 32×32 canvas over clutter — a fashion_mnist
  garment from the last 10,000 pooled images, dimmed to U(0.25, 0.5) at its own offset —
  taking the pixelwise max, plus N(0, 0.05²) noise, clipped to [0, 1]. Targets per image:
  ``mask`` (digit ink > 0.3), ``saliency`` (the digit's ink blurred by a Gaussian of σ = 1.5 px,
  scaled to max 1), ``edges`` (mask pixels with a 4-neighbour outside the mask) and ``cls``
  (the digit).

Seeded (numpy ``default_rng(seed)``); images are float32 (n, 1, 32, 32) in [0, 1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from splice.errors import SpliceError

__all__ = ["SIDE", "cluttered_digits", "garments"]

SIDE = 32


def _paste(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((SIDE, SIDE), np.float32)
    h, w = img.shape
    dy, dx = rng.integers(0, SIDE - h + 1), rng.integers(0, SIDE - w + 1)
    out[dy : dy + h, dx : dx + w] = img
    return out


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, x)


@lru_cache(maxsize=1)
def _fashion() -> tuple:
    from splice.data import TASKS

    return TASKS.get("fashion_mnist").read()


def garments(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` garment images (n, 1, 32, 32) float32 and their labels (n,) int64."""
    images, labels, _ = _fashion()
    if not 0 < n <= len(images) - 10000:
        raise SpliceError(f"n={n} garments requested", fix=f"use 1…{len(images) - 10000}")
    rng = np.random.default_rng(seed)
    out = np.stack([_paste(im / 255.0, rng) for im in images[:n]])[:, None]
    return out.astype(np.float32), labels[:n].astype(np.int64)


def cluttered_digits(n: int = 5000, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` images (n, 1, 32, 32) and their targets: mask, saliency, edges (n, 32, 32)
    float32 and cls (n,) int64."""
    from splice.data import TASKS

    digits, labels, _ = TASKS.get("mnist_5k").read()
    if not 0 < n <= len(digits):
        raise SpliceError(f"n={n} digits requested", fix=f"use 1…{len(digits)}")
    clutter = _fashion()[0][-10000:]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))[:n]
    images = np.empty((n, 1, SIDE, SIDE), np.float32)
    targets = {k: np.empty((n, SIDE, SIDE), np.float32) for k in ("mask", "saliency", "edges")}
    for j, i in enumerate(order):
        ink = _paste(digits[i] / 255.0, rng)
        back = _paste(clutter[rng.integers(len(clutter))] / 255.0, rng) * rng.uniform(0.25, 0.5)
        img = np.maximum(back, ink * rng.uniform(0.7, 1.0)) + rng.normal(0, 0.05, ink.shape)
        images[j, 0] = np.clip(img, 0, 1)
        mask = ink > 0.3
        sal = _blur(ink, 1.5)
        inner = np.pad(mask, 1)
        interior = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        targets["mask"][j], targets["saliency"][j] = mask, sal / max(sal.max(), 1e-6)
        targets["edges"][j] = mask & ~interior
    targets["cls"] = labels[order].astype(np.int64)
    return images, targets
