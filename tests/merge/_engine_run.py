"""Run a method through the engine on two tiny on-disk checkpoints, and directly per tensor."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from splice.io import open_checkpoint
from splice.merge import merge
from splice.merge.base import MergeContext, MergeMethod
from splice.merge.engine import layer_indices
from tests.merge._ckpt import finetune, save, tiny_llama


def engine_merge(
    tmp_path: Path, method: str, params: dict, weights: list[float] | None = None, **extra
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], dict[str, Tensor]]:
    """``(base, fine-tunes, merged)``: two fine-tunes of a tiny Llama merged from disk."""
    base = tiny_llama(0)
    fts = [finetune(base, s, scale=0.1) for s in range(2)]
    save(base, tmp_path / "base", shard=2500)
    models: list[str | dict] = []
    for i, ft in enumerate(fts):
        save(ft, tmp_path / f"ft{i}", shard=2500)
        path = str(tmp_path / f"ft{i}")
        models.append(path if weights is None else {"path": path, "params": {"weight": weights[i]}})
    recipe = {
        "method": method,
        "base": str(tmp_path / "base"),
        "models": models,
        "params": params,
        **extra,
    }
    out = merge(recipe, tmp_path / "out")
    ckpt = open_checkpoint(out)
    return base, fts, {n: ckpt[n] for n in ckpt}


def direct_merge(
    method: MergeMethod,
    base: dict[str, Tensor],
    fts: list[dict[str, Tensor]],
    params,
    model_params: list,
) -> dict[str, Tensor]:
    """The method called by hand on every float tensor; other tensors copied from the base."""
    layers = layer_indices(list(base))
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        layer, num = layers.get(name, (None, None))
        ctx = MergeContext(name, layer=layer, num_layers=num)
        out[name] = method.merge(b, [ft[name].clone() for ft in fts], params, model_params, ctx)
    return out
