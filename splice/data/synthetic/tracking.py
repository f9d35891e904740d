"""Synthetic single-object tracking sequences with a second ("thermal") modality (issue #34).

Generation (seeded, numpy; everything here is ours, not a tracking benchmark):

- A 64×64 frame holds a low-frequency background gradient, Gaussian noise (σ 0.03) and
  ``distractors`` other digits (intensity 0.4–1.0), each moving with its own velocity.
- The target is one digit (intensity 1.0) rescaled to 14–22 px, moving at up to ``speed``
  px/frame and bouncing off the borders; its size breathes by ±12 % along the sequence.
  Its box is the tight box of its pixels above 0.3, in frame pixels ``(x0, y0, x1, y1)``.
- The "thermal" frame shows blurred silhouettes: the target hot (0.9), each distractor hot
  with probability 0.5 (0.4–0.9), over a dim noisy background. It carries no digit detail.
- With probability ``dark_prob`` a sequence has a dark spell of 8 frames in which the visible
  frame is dimmed to 15 % and noisier (σ 0.1): the target is nearly invisible there, while
  the thermal frame is unaffected — what the second modality is for.

Digits come from the packaged ``mnist_5k`` task: even indices feed ``split="train"``, odd ones
``split="test"``, so test sequences never reuse a training digit image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from splice.errors import SpliceError

__all__ = ["Sequences", "TrackingConfig", "make_sequences", "tracking_sequences"]


@dataclass(frozen=True)
class TrackingConfig:
    frame: int = 64
    length: int = 24
    size: tuple[int, int] = (14, 22)
    speed: float = 2.5
    distractors: int = 4
    dark_prob: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sequences:
    """``rgb`` and ``thermal`` (N, L, H, W) float32 in [0, 1] (the visible frame is grey;
    "rgb" names its role), ``boxes`` (N, L, 4) float32 ``(x0, y0, x1, y1)``, ``dark`` (N, L)
    bool: frames of a dark spell."""

    rgb: np.ndarray
    thermal: np.ndarray
    boxes: np.ndarray
    dark: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square image to ``size``×``size`` (numpy only)."""
    n = img.shape[0]
    c = (np.arange(size) + 0.5) * n / size - 0.5
    c = np.clip(c, 0, n - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    f = c - i0
    rows = img[i0] * (1 - f)[:, None] + img[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def _blur(img: np.ndarray) -> np.ndarray:
    """A 3×3 binomial blur (twice): soft silhouettes for the thermal frame."""
    for _ in range(2):
        p = np.pad(img, 1, mode="edge")
        img = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
        img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) / 4
    return img


def _paste(canvas: np.ndarray, sprite: np.ndarray, x: int, y: int, value: float) -> None:
    """canvas ← max(canvas, value·sprite) at top-left (x, y), clipped to the canvas."""
    h, w = sprite.shape
    H, W = canvas.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return
    part = sprite[y0 - y : y1 - y, x0 - x : x1 - x] * value
    np.maximum(canvas[y0:y1, x0:x1], part, out=canvas[y0:y1, x0:x1])


def _walk(rng: np.random.Generator, n: int, lo: float, hi: float, speed: float) -> np.ndarray:
    """Positions (n, 2) of a point bouncing inside [lo, hi]² at a random constant velocity."""
    pos = rng.uniform(lo, hi, 2)
    vel = rng.uniform(-speed, speed, 2)
    out = np.empty((n, 2))
    for t in range(n):
        out[t] = pos
        pos = pos + vel
        for a in range(2):
            if not lo <= pos[a] <= hi:
                vel[a] = -vel[a]
                pos[a] = np.clip(pos[a], lo, hi)
    return out


def make_sequences(
    digits: np.ndarray, n: int, cfg: TrackingConfig = TrackingConfig(), seed: int = 0
) -> Sequences:
    """``n`` sequences built from ``digits`` (M, h, w) uint8 or [0, 1] float images."""
    if len(digits) < cfg.distractors + 1:
        raise SpliceError(
            f"{len(digits)} digit images for {cfg.distractors} distractors + a target",
            fix="pass more digit images",
        )
    if int(np.ceil(cfg.size[1] * 1.12)) + 2 > cfg.frame:
        raise SpliceError(f"target size {cfg.size[1]} does not fit a {cfg.frame}px frame")
    imgs = digits.astype(np.float32)
    imgs = imgs / 255.0 if digits.dtype == np.uint8 else imgs
    rng = np.random.default_rng(seed)
    F, L = cfg.frame, cfg.length
    rgb = np.empty((n, L, F, F), np.float32)
    thermal = np.empty((n, L, F, F), np.float32)
    boxes = np.empty((n, L, 4), np.float32)
    dark = np.zeros((n, L), bool)
    yy, xx = np.mgrid[0:F, 0:F] / F
    for i in range(n):
        pick = rng.choice(len(imgs), cfg.distractors + 1, replace=False)
        base = float(rng.integers(cfg.size[0], cfg.size[1] + 1))
        phase, omega = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3)
        path = _walk(rng, L, 0, F - int(np.ceil(cfg.size[1] * 1.12)) - 1, cfg.speed)
        others = [
            (
                _resize(imgs[j], int(rng.integers(cfg.size[0], cfg.size[1] + 1))),
                _walk(rng, L, -4, F - 8, cfg.speed * 0.6),
                rng.uniform(0.4, 1.0),
                rng.uniform(0.4, 0.9) if rng.random() < 0.5 else 0.0,
            )
            for j in pick[1:]
        ]
        gx, gy = rng.uniform(-0.15, 0.15, 2)
        background = (0.15 + gx * xx + gy * yy).astype(np.float32)
        if rng.random() < cfg.dark_prob:
            start = int(rng.integers(2, max(L - 8, 3)))
            dark[i, start : start + 8] = True
        for t in range(L):
            vis = background + rng.normal(0, 0.03, (F, F))
            hot = 0.1 + rng.normal(0, 0.03, (F, F))
            for sprite, walk, value, heat in others:
                x, y = walk[t].round().astype(int).tolist()
                _paste(vis, sprite, x, y, value)
                if heat:
                    _paste(hot, _blur(sprite), x, y, heat)
            size = round(base * (1 + 0.12 * np.sin(phase + omega * t)))
            sprite = _resize(imgs[pick[0]], size)
            x, y = path[t].round().astype(int).tolist()
            _paste(vis, sprite, x, y, 1.0)
            _paste(hot, _blur(sprite), x, y, 0.9)
            ys, xs = np.nonzero(sprite > 0.3)
            boxes[i, t] = (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)
            if dark[i, t]:
                vis = vis * 0.15 + rng.normal(0, 0.1, (F, F))
            rgb[i, t] = np.clip(vis, 0, 1)
            thermal[i, t] = np.clip(hot, 0, 1)
    return Sequences(rgb, thermal, boxes, dark)


def tracking_sequences(
    split: str, n: int, cfg: TrackingConfig = TrackingConfig(), seed: int = 0
) -> Sequences:
    """``n`` sequences from the packaged MNIST digits of ``split`` ("train" or "test")."""
    from splice.data.tasks import mnist_5k

    if split not in ("train", "test"):
        raise SpliceError(f"unknown split {split!r}", fix="use 'train' or 'test'")
    x, _, _ = mnist_5k.read()
    return make_sequences(x[0 if split == "train" else 1 :: 2], n, cfg, seed)
