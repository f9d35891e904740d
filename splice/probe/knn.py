"""Leave-one-out nearest neighbours of token representations (other.md §6.3, step 2).

The search is scikit-learn's :class:`~sklearn.neighbors.NearestNeighbors` (exact, cosine);
splice only removes each point from its own neighbourhood, so a local fit never sees the
token it predicts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["knn_loo"]


def knn_loo(x: Tensor, k: int, *, metric: str = "cosine") -> Tensor:
    """Indices ``[N, k]`` of each row's ``k`` nearest other rows of ``x`` ``[N, d]``.

    Raises:
        ValueError: ``k`` is not in ``1 … N-1``.
    """
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} neighbours need 2…{n} points besides the token; have {n}")
    data = x.detach().double().cpu().numpy()
    index = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm="brute").fit(data)
    found = index.kneighbors(data, return_distance=False)  # [N, k+1], self usually first
    rows = np.arange(n)[:, None]
    is_self = found == rows
    # Drop the point itself where found (a duplicate may outrank it), else the farthest.
    drop = np.where(is_self.any(1), is_self.argmax(1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(n), drop] = False
    return torch.from_numpy(found[keep].reshape(n, k))
