"""The cache of the domain benchmarks' trained modules (issue #34): pretrained backbones and
adapted trackers, keyed by what produced them, so a second run skips the training.

An entry is ``<cache>/domains/<kind>-<hash of config>.safetensors`` (the module's state) with
its metadata (JSON: the training's figures) in the safetensors header; it is written to a
temporary sibling and renamed into place, so an interrupted run leaves no half entry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from splice.data.cache import cache_root, stable_hash

__all__ = ["cached_module", "entry_path"]


def entry_path(kind: str, config: dict[str, Any]) -> Path:
    return cache_root() / "domains" / f"{kind}-{stable_hash(config)}.safetensors"


def cached_module(
    kind: str,
    config: dict[str, Any],
    module: nn.Module,
    train: Callable[[nn.Module], dict[str, Any]],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fill ``module`` from the cache entry of (kind, config), or ``train`` it (in place) and
    store it; returns the training's metadata (with ``"cached": True`` on a hit)."""
    from safetensors.torch import load_file, safe_open, save_file

    path = entry_path(kind, config)
    if path.is_file():
        module.load_state_dict(load_file(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        log(f"{kind}: cached ({path.name})")
        return {**meta, "cached": True}
    meta = train(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, tmp, metadata={"meta": json.dumps(meta), "config": json.dumps(config)})
    os.replace(tmp, path)
    return {**meta, "cached": False}
