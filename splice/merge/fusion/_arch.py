"""Build the models OT fusion reads from checkpoint files: ``--arch module:factory``.

``module`` is a dotted module name or a path to a ``.py`` file; ``factory`` a callable in it
that returns an ``nn.Module``. A factory that takes an argument receives the checkpoint's
tensors (``{name: Tensor}``), so it can read the widths of a model of another size; one that
takes none is called bare. The checkpoint's tensors are then loaded strictly.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from splice.errors import SpliceError, UsageError

__all__ = ["build", "load_factory", "read_inputs", "read_tensors"]


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:factory`` (``module`` dotted or a ``.py`` path).

    Raises:
        UsageError: not ``module:factory``.
        SpliceError: the module cannot be imported or has no such callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not (sep and module_name and attr):
        raise UsageError(f"--arch {spec!r} is not module:factory", fix="e.g. --arch my_arch.py:mlp")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(module_name)
            found = importlib.util.spec_from_file_location(f"_splice_arch_{path.stem}", path)
            assert found is not None and found.loader is not None
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # the user's code: any error is a one-line message
        raise SpliceError(
            f"cannot import {module_name!r}: {type(e).__name__}: {e}", where="--arch"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpliceError(f"{module_name!r} has no callable {attr!r}", where="--arch")
    return factory


def build(factory: Callable[..., Any], tensors: Mapping[str, Tensor], where: str) -> nn.Module:
    """``factory()`` (or ``factory(tensors)``) with ``tensors`` loaded strictly, in eval mode.

    Raises:
        SpliceError: the factory fails or returns no module, or the tensors do not fit it.
    """
    takes = len(inspect.signature(factory).parameters) > 0
    try:
        model = factory(dict(tensors)) if takes else factory()
    except Exception as e:
        raise SpliceError(
            f"the --arch factory failed: {type(e).__name__}: {e}", where=where
        ) from None
    if not isinstance(model, nn.Module):
        raise SpliceError(f"the --arch factory returned {type(model).__name__}, not an nn.Module")
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [n for n in own if n in tensors and tuple(own[n].shape) != tuple(tensors[n].shape)]
    if missing or extra or shapes:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                else f"shape of {shapes[:3]}")  # fmt: skip
        raise SpliceError(
            f"the checkpoint does not fit the --arch model ({what})",
            where=where,
            fix="pass a factory that builds this checkpoint's architecture",
        )
    model.load_state_dict({n: tensors[n] for n in own})
    return model.eval()


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file or model directory (``splice.io``)."""
    from splice.io import open_checkpoint

    ckpt = open_checkpoint(path)
    return {n: ckpt[n] for n in ckpt.names()}


def read_inputs(path: str | Path) -> Tensor:
    """Unlabeled inputs for activation costs: the single tensor of a safetensors file (or
    its ``inputs`` tensor), or a ``.npy`` array.

    Raises:
        SpliceError: several tensors and none named ``inputs``, or another file type.
    """
    import numpy as np
    import torch

    p = Path(path)
    if p.suffix == ".npy":
        return torch.from_numpy(np.load(p, allow_pickle=False))
    if p.suffix != ".safetensors":
        raise SpliceError("inputs must be a .safetensors or .npy file", where=str(p))
    tensors = read_tensors(p)
    if "inputs" in tensors:
        return tensors["inputs"]
    if len(tensors) != 1:
        raise SpliceError(
            f"{len(tensors)} tensors and none named 'inputs'", where=str(p),
            fix="store the inputs as the file's only tensor or name it 'inputs'",
        )  # fmt: skip
    return next(iter(tensors.values()))
