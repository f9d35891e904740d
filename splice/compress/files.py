"""Quantized models on disk: integer weights with per-channel steps and zero points in one
safetensors file, and the loaders that read them back.

``model.safetensors`` holds, for each quantized layer ``L``: ``L.qweight`` (the codes, packed
little-end first: four per byte at ≤ 2 bits, two at ≤ 4, else one), ``L.weight_scale``
(float32, one per output channel), ``L.weight_zero`` (uint8), and for a quantized input
``L.input_scale``/``L.input_zero`` (scalars); the weight is ``scale·(q − zero)``. Every other
tensor of the model is stored under its own name at its own dtype. The header's
``__metadata__`` has one key, ``splice-quantized``: JSON ``{"version": 1, "layers": {name:
{bits, a_bits, shape}}}``. :func:`dequantize` needs only torch and safetensors;
:func:`apply_quantized` rebuilds the quantized layers, inputs included, so outputs equal
the fake-quant model's.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from splice.compress.qlayer import QuantLayer, quant_layers, set_module
from splice.errors import SpliceError

__all__ = ["FORMAT", "WEIGHTS", "apply_quantized", "dequantize", "pack", "save_quantized", "unpack"]

FORMAT = "splice-quantized"
WEIGHTS = "model.safetensors"


def _per_byte(bits: int) -> int:
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


def pack(q: Tensor, bits: int) -> Tensor:
    """Flat uint8 codes of ``bits`` bits, several to a byte (the first in the low bits)."""
    per, width = _per_byte(bits), 8 // _per_byte(bits)
    flat = q.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per)]).reshape(-1, per)
    out = torch.zeros(flat.shape[0], dtype=torch.uint8)
    for j in range(per):
        out |= flat[:, j] << (j * width)
    return out


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack`: ``count`` uint8 codes."""
    per, width = _per_byte(bits), 8 // _per_byte(bits)
    mask = (1 << width) - 1
    cols = [(packed >> (j * width)) & mask for j in range(per)]
    return torch.stack(cols, 1).reshape(-1)[:count]


def _layer_tensors(name: str, layer: QuantLayer) -> dict[str, Tensor]:
    out = {
        f"{name}.qweight": pack(layer.qweight, layer.w_bits),
        f"{name}.weight_scale": layer.weight_scale.reshape(-1).float().contiguous(),
        f"{name}.weight_zero": layer.weight_zero.reshape(-1).to(torch.uint8),
    }
    if layer.aq is not None:
        out[f"{name}.input_scale"] = layer.input_scale.reshape(()).float()
        out[f"{name}.input_zero"] = layer.input_zero.reshape(()).to(torch.uint8)
    return out


def save_quantized(
    model: nn.Module, path: str | Path, files: dict[str, str | Path] | None = None
) -> Path:
    """Write ``model`` (with :class:`QuantLayer`s, frozen here in place: outputs unchanged) to
    the directory ``path``, atomically; ``files`` adds files (name → text, or a file to copy)."""
    from safetensors.torch import save_file

    from splice.io.atomic import atomic_dir

    layers = dict(quant_layers(model))
    if not layers:
        raise SpliceError("the model has no quantized layer", fix="quantize it first")
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}
    for name, layer in layers.items():
        if not layer.frozen:
            layer.freeze()
        tensors.update(_layer_tensors(name, layer))
        meta[name] = {
            "bits": layer.w_bits,
            "a_bits": layer.a_bits,
            "shape": list(layer.qweight.shape),
        }
    for key, t in model.state_dict().items():
        owner = next((n for n in layers if key.startswith(f"{n}.")), None)
        if owner is None:
            tensors[key] = t.contiguous()
        elif key.startswith(f"{owner}.base."):
            tensors[f"{owner}.{key.removeprefix(f'{owner}.base.')}"] = t.contiguous()
    # one key: safetensors orders several metadata keys at random, and the bytes must repeat
    metadata = {FORMAT: json.dumps({"version": 1, "layers": meta}, sort_keys=True)}
    with atomic_dir(Path(path)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)
        for fname, content in (files or {}).items():
            if isinstance(content, Path):
                shutil.copy2(content, tmp / fname)
            else:
                (tmp / fname).write_text(content)
    return Path(path)


def _read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, dict]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise SpliceError(
            "no quantized weights", where=str(file), fix="pass a splice quantize output dir"
        )
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    if FORMAT not in meta:
        raise SpliceError(
            f"not a {FORMAT} file", where=str(file), fix="pass a splice quantize output dir"
        )
    return load_file(str(file)), json.loads(meta[FORMAT])["layers"]


def _weight(tensors: dict[str, Tensor], name: str, info: dict) -> tuple[Tensor, Tensor, Tensor]:
    shape = tuple(info["shape"])
    q = unpack(tensors[f"{name}.qweight"], info["bits"], math.prod(shape)).reshape(shape)
    view = (shape[0],) + (1,) * (len(shape) - 1)
    scale = tensors[f"{name}.weight_scale"].reshape(view)
    zero = tensors[f"{name}.weight_zero"].float().reshape(view)
    return q, scale, zero


def dequantize(path: str | Path) -> dict[str, Tensor]:
    """A plain float state dict (``L.weight = scale·(q − zero)``) for ``load_state_dict`` of
    the original architecture. Inputs are not quantized there: use :func:`apply_quantized`
    for outputs equal to the quantized model's."""
    tensors, layers = _read(path)
    out = {}
    for name, info in layers.items():
        q, scale, zero = _weight(tensors, name, info)
        out[f"{name}.weight"] = scale * (q.float() - zero)
    skip = {
        f"{n}.{s}"
        for n in layers
        for s in ("qweight", "weight_scale", "weight_zero", "input_scale", "input_zero")
    }
    out.update({k: v for k, v in tensors.items() if k not in skip})
    return out


@torch.no_grad()
def apply_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a saved quantized model into ``model`` (the original float architecture): each
    quantized layer becomes a frozen :class:`QuantLayer`; returns ``model``."""
    tensors, layers = _read(path)
    rest = dict(tensors)
    for name, info in layers.items():
        layer = QuantLayer(model.get_submodule(name), info["bits"], info["a_bits"])
        q, scale, zero = _weight(tensors, name, info)
        layer.register_buffer("qweight", q.to(torch.uint8))
        layer.register_buffer("weight_scale", scale.clone())
        layer.register_buffer("weight_zero", zero)
        if layer.aq is not None:
            layer.register_buffer("input_scale", tensors[f"{name}.input_scale"].clone())
            layer.register_buffer("input_zero", tensors[f"{name}.input_zero"].float())
        layer.frozen = True
        del layer.base.weight
        layer.base.weight = None
        set_module(model, name, layer)
        for s in ("qweight", "weight_scale", "weight_zero", "input_scale", "input_zero"):
            rest.pop(f"{name}.{s}", None)
    keys = {k: k for k in model.state_dict()}
    for name in layers:  # stored as L.bias, held as L.base.bias
        keys.update(
            {f"{name}.{k[len(name) + 6 :]}": k for k in keys if k.startswith(f"{name}.base.")}
        )
    unknown = [k for k in rest if k not in keys]
    if unknown:
        raise SpliceError(f"tensor {unknown[0]!r} has no place in the model", where=str(path),
                          fix="load into the architecture that was quantized")  # fmt: skip
    state = model.state_dict()
    for k, v in rest.items():
        state[keys[k]].copy_(v)
    return model
